"""``FairnessMetrics``: streaming, DDP-correct group fairness from per-group confusion counts.

Each validation (and/or test) batch adds its (true class, predicted class) pairs to one count
table per group and sensitive-feature entry, a torchmetrics state on the device (no host sync,
``dist_reduce_fx="sum"``): its memory is O(groups x classes), independent of the rows. At the
epoch's end the tables are summed over ranks once and every number fairlearn's ``MetricFrame``
would give on the same predictions is computed from them, exactly
(:mod:`~lightning_trust.fairness.tables`). Numbers are logged, checked against declared limits,
written as a CSV table and a bar chart, and returned by ``report()``. Bootstrap intervals come
from streaming Poisson-bootstrap replicate tables (``n_boot``).

The sensitive columns, the target and the prediction shape are checked on the first batch the
callback sees: in the sanity pass, else on one validation batch at the start of training,
before any optimizer step; a module without ``validation_step`` is refused at setup.

Several sensitive features: ``sensitive_features: [sex, race, [sex, race]]`` — each entry is a
side column or a list of columns (their intersection, named ``"sex*race"``). Every entry gets its
own MetricFrame (``report()["by_feature"][entry]``, ``report()["by_group"][entry]``); the top-level
summaries are the worst over entries (largest difference, smallest ratio), and
``worst_feature[summary]`` names the entry that attains it.

Multiclass predictions (``[B, C]`` logits with ``C > 2``) are scored one-vs-rest: every class's
table and summaries sit under ``by_feature[entry]["classes"][class]``, the entry's summaries are the
worst over classes.

Several validation dataloaders are pooled into one table. Under DDP, Lightning's default
``DistributedSampler`` pads the last shard with repeated samples so ranks get equal counts (at most
``world_size - 1`` duplicates); the numbers then include those, as any DDP metric does. Use
``use_distributed_sampler=False`` with your own unpadded per-rank shards for exact counts; every
rank must see at least one batch (the tables are created at the first one).

Logged keys: :attr:`FairnessMetrics.logged_keys` (``fairness/<metric>/sex=Female`` per group,
``fairness/<summary>`` the worst over entries, ``fairness/<summary>/<entry>`` with several entries;
``fairness_test/`` for the test stage). A flagged group or a breached limit warns once per run;
every epoch's numbers are logged.

Example:
    >>> callback = FairnessMetrics(sensitive_features=["sex", "race", ["sex", "race"]],
    ...                            thresholds={"demographic_parity_difference": 0.1}, action="warn")
    >>> callback.report_name, [entry_name(e) for e in callback.entries]
    ('fairness', ['sex', 'race', 'sex*race'])
    >>> trainer = pl.Trainer(callbacks=[callback])  # doctest: +SKIP
    >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage
from typing_extensions import override

from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability
from lightning_trust.core.output import DeferredFigures, artifact_dir
from lightning_trust.core.seam import state_key_of, trained_epoch
from lightning_trust.fairness.breaches import (
    FairnessBreachError,
    breaches_limit,
    find_breaches,
    raise_breaches,
    warn_results,
)
from lightning_trust.fairness.checks import require_step
from lightning_trust.fairness.collect import CountCollector
from lightning_trust.fairness.groups import SUMMARIES, entry_name, parse_entries, validate_metrics
from lightning_trust.fairness.metrics_args import (
    DEFAULT_METRICS,
    Stage,
    check_figures,
    check_metrics_args,
    check_num_groups,
)
from lightning_trust.fairness.predictions import Activation
from lightning_trust.fairness.publish import artifact_paths, log_results, write_artifacts, write_figures

__all__ = ["FairnessBreachError", "FairnessMetrics"]

_STAGES: dict[RunningStage, Stage] = {RunningStage.VALIDATING: "validation", RunningStage.TESTING: "test"}
_NO_VALIDATION_FIX = " or measure the test loop instead (`stages=['test']` and a `test_step`)"


class FairnessMetrics(TrustCallback):
    """Group fairness of the model's predictions, every validation/test epoch, from Fairlearn.

    Args:
        sensitive_features: side columns of the batch contract; a list entry (or ``"a*b"``) is an
            intersection. Integer codes are named by ``trainer.datamodule.categories[column]``.
        metrics: per-group metrics by name: ``accuracy``, ``balanced_accuracy``, ``selection_rate``,
            ``true_positive_rate``, ``false_positive_rate``, ``false_negative_rate``, ``precision``,
            ``recall``, ``f1``, ``count``. A rate with an empty denominator in a group is
            fairlearn's value (0.0, so a disparity is never smaller than fairlearn's) and flagged.
        stages: ``"validation"`` and/or ``"test"``.
        positive_label: the positive class for binary targets (and 2-class logits).
        threshold: decision threshold on the positive score (binary).
        activation: how predictions become scores: ``auto`` (softmax over 2+ logits, sigmoid of one
            logit), ``softmax``, ``sigmoid``, ``none`` (already probabilities).
        n_boot: Poisson-bootstrap replicate count tables for confidence intervals; ``None`` = off.
            Each batch adds ``n_boot`` Poisson(1) weights per sample; memory ``n_boot`` x the tables.
        ci_stages: the stages that get intervals (default: all of ``stages``).
        ci_quantiles: the interval's quantiles.
        random_state: the bootstrap seed (offset per rank, stage and epoch).
        thresholds: limits on summaries, e.g. ``{demographic_parity_difference: 0.1,
            demographic_parity_ratio: 0.8}``; a difference above / a ratio below its limit (or an
            undefined value) is a breach (see :meth:`breached`).
        action: on a breach: ``warn`` (once per run; every epoch's count is logged); ``stop`` (ends
            fitting through ``trainer.should_stop``); ``fail`` (raises :class:`FairnessBreachError`
            at the end of fit / test).
        min_group_size: groups with fewer samples are reported with ``small: true`` and flagged.
        num_groups: groups of side columns the datamodule does not name in ``categories``
            (default 32: codes 0..31); a code outside a column's groups is refused.
        figures: when the bar charts (one PNG per metric) are drawn: ``report`` (when
            :meth:`report` is first read after a stage, e.g. by ``TrustReport``: matplotlib costs
            about a second a chart, more than the metric), ``stage_end``, or ``never``. The CSV
            table and the JSON results are written at every stage end.
        log_groups: log every per-group number (else only the summaries).
        batch_keys: batch contract overrides (see :class:`~lightning_trust.core.batch.BatchContract`).
        name: the report section, logging prefix and file folder (default ``fairness``); two
            ``FairnessMetrics`` in one Trainer need distinct names.
    """

    report_section = "fairness"
    # the forward of a step that neither returns predictions nor calls the module runs here, isolated
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EXTRA_PASSES})
    #: What it logs (validation; ``fairness_test/`` for the test stage; ``<name>/`` when named).
    logged_keys: ClassVar[dict[str, str]] = {
        "fairness/<summary>": "a disparity summary, the worst over the sensitive feature entries",
        "fairness/<summary>/<entry>": "a disparity summary of one entry (with several entries)",
        "fairness/<metric>/<groups>": "a per-group metric (`sex=Female,race=White`; `/class=<c>` for multiclass)",
        "fairness/flagged": "how many group numbers are flagged this epoch (small or undefined)",
        "fairness/breaches": "how many declared limits are breached this epoch",
        "fairness_test/<summary>": "a disparity summary on the test data, the worst over the entries",
        "fairness_test/<summary>/<entry>": "a disparity summary of one entry on the test data",
        "fairness_test/<metric>/<groups>": "a per-group metric on the test data",
        "fairness_test/flagged": "how many group numbers are flagged on the test data",
        "fairness_test/breaches": "how many declared limits are breached on the test data",
    }
    #: The top-level keys of :meth:`report`.
    report_keys: ClassVar[dict[str, str]] = {
        **{s: f"{s.replace('_', ' ')}, the worst over the entries (latest stage)" for s in SUMMARIES},
        "num_samples": "samples scored (all ranks)",
        "state_bytes": "bytes of the count tables (the memory of the streaming state)",
        "num_classes": "2 for binary predictions, else the number of classes (one-vs-rest)",
        "worst_feature": "summary -> the entry attaining the worst value",
        "overall": "each metric over all samples (per class for multiclass)",
        "by_feature": "entry -> its summaries (and intervals, per-class tables)",
        "by_group": "entry -> group -> metrics, count, small, log name",
        "flags": "small groups and undefined metrics, with the reason",
        "stage": "the stage of the latest numbers: validation or test",
        "epoch": "the epoch of the latest numbers",
        "step": "the global step of the latest numbers",
        "validation": "the validation summaries, when the test stage ran after them",
        "sensitive_features": "the entries, by name",
        "metrics": "the per-group metrics computed",
        "thresholds": "the declared limits on summaries",
        "action": "what a breach does: warn, stop or fail",
        "breaches": "every breached limit: stage, epoch, summary, value, limit, feature",
        "history": "the summaries of every epoch",
        "files": "the CSV tables written",
    }

    def __init__(
        self,
        sensitive_features: Union[str, list[Union[str, list[str]]]] = "sex",
        metrics: Optional[list[str]] = None,
        stages: Union[Stage, list[Stage]] = "validation",
        positive_label: int = 1,
        threshold: float = 0.5,
        activation: Activation = "auto",
        n_boot: Optional[int] = None,
        ci_quantiles: Optional[list[float]] = None,
        ci_stages: Optional[list[Stage]] = None,
        random_state: int = 0,
        thresholds: Optional[dict[str, float]] = None,
        action: Literal["warn", "stop", "fail"] = "warn",
        min_group_size: int = 30,
        log_groups: bool = True,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
        num_groups: Optional[dict[str, int]] = None,
        figures: Literal["report", "stage_end", "never"] = "report",
    ) -> None:
        super().__init__(name=name)
        self.entries = parse_entries(sensitive_features)
        self.metrics = validate_metrics(DEFAULT_METRICS if metrics is None else metrics)
        self.stages, self.ci_quantiles, self.ci_stages, self.thresholds = check_metrics_args(
            stages, positive_label, threshold, activation, n_boot, ci_quantiles, ci_stages, thresholds, action,
            min_group_size,
        )  # fmt: skip
        self.positive_label = positive_label
        self.threshold = float(threshold)
        self.activation = activation
        self.n_boot = n_boot
        self.random_state = random_state
        self.action = action
        self.min_group_size = min_group_size
        self.log_groups = log_groups
        self.batch_keys = batch_keys
        self._collector = CountCollector(
            self.entries, check_num_groups(num_groups), n_boot or 0, activation, positive_label, self.threshold,
        )  # fmt: skip
        self.columns = self._collector.columns
        self.results: dict[str, dict[str, Any]] = {}  # stage -> latest results
        self.history: list[dict[str, Any]] = []
        self.breaches: list[dict[str, Any]] = []
        self.files: dict[str, str] = {}
        self.figures: dict[str, str] = {}
        self.figures_when = check_figures(figures)
        self._pending_figures = DeferredFigures()

    @property
    def state_key(self) -> str:
        names = {"name": self.name} if self.name else {}
        return state_key_of(self, entries=[entry_name(e) for e in self.entries], stages=self.stages, **names)

    def prefix(self, stage: str) -> str:
        """The logging prefix of ``stage``: ``fairness`` / ``fairness_test`` (``<name>``... when named)."""
        return self.report_name if stage == "validation" else f"{self.report_name}_test"

    # hooks ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage in ("fit", "validate") and "validation" in self.stages:
            require_step(pl_module, "validation_step", "FairnessMetrics", _NO_VALIDATION_FIX)
        if stage == "test" and "test" in self.stages:
            require_step(pl_module, "test_step", "FairnessMetrics", "")
        self._collector.setup(trainer, self.batch_keys)

    def _sanity(self, trainer: pl.Trainer) -> bool:
        """A sanity-check batch still to check (the first the callback sees)."""
        return trainer.sanity_checking and not self._collector.checked

    def _stage(self, trainer: pl.Trainer) -> Optional[Stage]:
        """The running stage this callback measures now, or ``None`` (sanity check, training...)."""
        return _STAGES.get(trainer.state.stage) if trainer.state.stage is not None else None

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        stage = self._stage(trainer)
        return stage is None or stage not in self.stages

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validation" in self.stages:  # no sanity pass ran: check one batch before the first step
            self._collector.probe(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self._start(trainer, pl_module, "validation")

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._should_skip(trainer) or self._sanity(trainer):
            self._collector.arm(pl_module, batch)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._sanity(trainer):
            self._collector.check(batch, self._collector.predictions(pl_module, outputs, batch))
        elif not self._should_skip(trainer):
            self._collector.update(pl_module, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self._finish(trainer, pl_module, "validation")

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self._start(trainer, pl_module, "test")

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._should_skip(trainer):
            self._collector.arm(pl_module, batch)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._should_skip(trainer):
            self._collector.update(pl_module, outputs, batch)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self._finish(trainer, pl_module, "test")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, "validation")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, "test")

    # epochs ---------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        # the replicates' stream differs per rank (independent weights) and per stage and epoch
        seed = self.random_state + 7919 * trainer.global_rank + 104729 * (2 * trainer.current_epoch + (stage == "test"))
        self._collector.start(pl_module, seed)

    def compute(self, stage: Stage = "validation") -> dict[str, Any]:
        """Sum the epoch's count tables over ranks and compute every entry's numbers from them."""
        intervals = stage in self.ci_stages
        return self._collector.results(self.metrics, intervals, self.ci_quantiles, self.min_group_size)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if self._collector.counts is None or self._collector.counts.update_count == 0:
            return  # no batch reached the callback
        results = self.compute(stage)  # identical on every rank: each rank decides the same
        results.update(stage=stage, epoch=trained_epoch(trainer), step=int(trainer.global_step))
        self.results[stage] = results
        self.history.append(
            {"stage": stage, "epoch": results["epoch"], "step": results["step"], **{s: results[s] for s in SUMMARIES}}
        )
        breaches = find_breaches(results, self.thresholds, self.breached)
        self.breaches.extend(breaches)
        prefix, count = self.prefix(stage), len(breaches) if self.thresholds else None
        log_results(trainer, pl_module, prefix, results, self.metrics, len(self.entries) > 1, count, self.log_groups)
        warn_results(self, stage, prefix, results, breaches)  # once per condition and run; every epoch is logged
        if breaches and self.action == "stop" and stage == "validation":
            trainer.should_stop = True

    def breached(self, summary: str, value: float, limit: float) -> bool:
        """Whether ``value`` of ``summary`` breaches ``limit``: a difference above it, a ratio below
        it, or an undefined (NaN) value. Override for another rule."""
        return breaches_limit(summary, value, limit)

    def _end(self, trainer: pl.Trainer, stage: Stage) -> None:
        if stage in self.results:
            self._save_files(trainer, artifact_dir(trainer, self.report_name), stage)
        if self.action == "fail":
            raise_breaches(stage, self.breaches)

    # files ------------------------------------------------------------------------------------
    def _save_files(self, trainer: pl.Trainer, folder: Path, stage: str) -> None:
        # `folder` comes from every rank (trainer.log_dir broadcasts); the files from rank zero
        self.files[f"table_{stage}"], figures = artifact_paths(folder, stage, self.metrics)
        if self.figures_when != "never":
            self.figures.update(figures)
        if trainer.is_global_zero:
            results, prefix = self.results[stage], self.prefix(stage)
            write_artifacts(trainer, folder, stage, results, self.metrics)
            draw = partial(write_figures, trainer, folder, stage, results, self.metrics, self.min_group_size, prefix)
            self._pending_figures.defer(stage, draw)
            if self.figures_when == "stage_end":
                self._draw_figures()

    def _draw_figures(self) -> None:
        """Draw the bar charts still owed (once: when the report is first read, or at the stage end)."""
        if self.figures_when != "never":
            self._pending_figures.draw()
        self._pending_figures.clear()

    # report / checkpoint ----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The latest results (test if it ran after fit, else validation) plus breaches and history."""
        self._draw_figures()
        latest = self.results.get("test") if "test" in self.results else self.results.get("validation")
        out: dict[str, Any] = {}
        if latest is not None:
            out.update(latest)
        if "test" in self.results and "validation" in self.results:
            out["validation"] = {s: self.results["validation"][s] for s in SUMMARIES}
        out.update(
            sensitive_features=[entry_name(e) for e in self.entries],
            metrics=list(self.metrics),
            thresholds=dict(self.thresholds),
            action=self.action,
            breaches=list(self.breaches),
            history=list(self.history),
            files=dict(self.files),
            figures=dict(self.figures),
        )
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "history": self.history, "breaches": self.breaches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))
        self.breaches = list(state_dict.get("breaches", []))
