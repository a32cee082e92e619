"""``FairnessMetrics``: streaming, DDP-correct group fairness computed by Fairlearn's ``MetricFrame``.

Each validation (and/or test) batch adds its true labels, predicted labels and sensitive group
codes to a torchmetrics state on the device (no host sync); at the epoch's end the state is
gathered from every rank once and ``fairlearn.metrics.MetricFrame`` computes the per-group table
and the disparity summaries. Numbers are logged, checked against declared limits, written as a
CSV table and a bar chart, and returned by ``report()``.

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
``use_distributed_sampler=False`` with your own unpadded per-rank shards for exact counts.

Logged keys (validation; ``fairness_test/`` for the test stage):
``fairness/<metric>/<feature>=<group>`` (``fairness/<metric>/sex=Female,race=White`` for an
intersection, ``.../class=<c>`` appended for multiclass), ``fairness/<summary>`` (worst) and
``fairness/<summary>/<entry>`` when there are several entries.

Example:
    >>> trainer = pl.Trainer(callbacks=[FairnessMetrics(sensitive_features=["sex", "race", ["sex", "race"]],
    ...                      thresholds={"demographic_parity_difference": 0.1}, action="warn")])
    >>> trainer.fit(TabularMLP(), AdultDataModule())
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_trust.core.batch import BatchContract, batch_size_of
from lightning_trust.fairness._core import (
    SUMMARIES,
    FairnessState,
    ForwardCapture,
    base_columns,
    entry_name,
    fairness_results,
    group_names,
    hard_predictions,
    is_ratio,
    parse_entries,
    read_codes,
    step_predictions,
    validate_metrics,
)
from lightning_trust.core import artifact_dir, new_figure, save_figure, write_json

Stage = Literal["validation", "test"]
Activation = Literal["auto", "softmax", "sigmoid", "none"]
DEFAULT_METRICS = ["accuracy", "selection_rate", "true_positive_rate", "false_positive_rate"]
_PREFIX = {"validation": "fairness", "test": "fairness_test"}


class FairnessBreachError(RuntimeError):
    """A declared fairness limit was breached and ``action="fail"``."""


class FairnessMetrics(Callback):
    """Group fairness of the model's predictions, every validation/test epoch, from Fairlearn.

    Args:
        sensitive_features: side columns of the batch contract; a list entry (or ``"a*b"``) is an
            intersection. Integer codes are named by ``trainer.datamodule.categories[column]``.
        metrics: per-group metrics by name: ``accuracy``, ``balanced_accuracy``, ``selection_rate``,
            ``true_positive_rate``, ``false_positive_rate``, ``false_negative_rate``, ``precision``,
            ``recall``, ``f1``, ``count``. Rates with an empty denominator in a group are NaN and
            flagged (fairlearn itself would return 0.0).
        stages: ``"validation"`` and/or ``"test"``.
        positive_label: the positive class for binary targets (and 2-class logits).
        threshold: decision threshold on the positive score (binary).
        activation: how predictions become scores: ``auto`` (softmax over 2+ logits, sigmoid of one
            logit), ``softmax``, ``sigmoid``, ``none`` (already probabilities).
        n_boot: bootstrap resamples for confidence intervals (MetricFrame's ``n_boot``); ``None`` = off.
            MetricFrame recomputes the per-sample table for each resample (about ``n_boot`` x 90 ms
            for 3,000 rows), so intervals are often best kept to the test stage (``ci_stages``).
        ci_stages: the stages that get intervals (default: all of ``stages``).
        ci_quantiles: the interval's quantiles.
        random_state: the bootstrap seed (MetricFrame's ``random_state``).
        thresholds: limits on summaries, e.g. ``{demographic_parity_difference: 0.1,
            demographic_parity_ratio: 0.8}``; a difference above / a ratio below its limit (or an
            undefined value) is a breach.
        action: on a breach: ``warn``; ``stop`` (ends fitting through ``trainer.should_stop``);
            ``fail`` (raises :class:`FairnessBreachError` at the end of fit / test).
        min_group_size: groups with fewer samples are reported with ``small: true`` and flagged.
        log_groups: log every per-group number (else only the summaries).
        batch_keys: batch contract overrides (see :class:`~lightning_trust.core.batch.BatchContract`).
    """

    report_section = "fairness"

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
    ) -> None:
        super().__init__()
        self.entries = parse_entries(sensitive_features)
        self.columns = base_columns(self.entries)
        self.metrics = validate_metrics(DEFAULT_METRICS if metrics is None else metrics)
        stages_list = [stages] if isinstance(stages, str) else list(stages)
        if not stages_list or any(s not in _PREFIX for s in stages_list):
            raise ValueError(f"`stages` must be 'validation' and/or 'test', got {stages!r}.")
        if not isinstance(positive_label, int):
            raise ValueError(f"`positive_label` must be an integer class index, got {positive_label!r}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` is a probability threshold in [0, 1], got {threshold}.")
        if activation not in ("auto", "softmax", "sigmoid", "none"):
            raise ValueError(f"`activation` must be auto, softmax, sigmoid or none, got {activation!r}.")
        if n_boot is not None and (not isinstance(n_boot, int) or n_boot < 1):
            raise ValueError(f"`n_boot` must be a positive integer (or None for no intervals), got {n_boot!r}.")
        ci_quantiles = [0.025, 0.975] if ci_quantiles is None else [float(q) for q in ci_quantiles]
        if len(ci_quantiles) != 2 or not 0 < ci_quantiles[0] < ci_quantiles[1] < 1:
            raise ValueError(f"`ci_quantiles` must be two increasing quantiles in (0, 1), got {ci_quantiles}.")
        ci_stages = list(stages_list if ci_stages is None else ci_stages)
        if any(s not in stages_list for s in ci_stages):
            raise ValueError(f"`ci_stages` {ci_stages} must be among `stages` {stages_list}.")
        thresholds = dict(thresholds or {})
        for name, limit in thresholds.items():
            if name not in SUMMARIES:
                raise ValueError(f"Unknown summary {name!r} in `thresholds`; choose from {list(SUMMARIES)}.")
            if not isinstance(limit, (int, float)) or not 0.0 <= float(limit) <= 1.0:
                raise ValueError(f"`thresholds[{name!r}]` must be a number in [0, 1], got {limit!r}.")
        if action not in ("warn", "stop", "fail"):
            raise ValueError(f"`action` must be 'warn', 'stop' or 'fail', got {action!r}.")
        if not isinstance(min_group_size, int) or min_group_size < 0:
            raise ValueError(f"`min_group_size` must be an integer >= 0, got {min_group_size!r}.")
        self.stages = stages_list
        self.positive_label = positive_label
        self.threshold = float(threshold)
        self.activation = activation
        self.n_boot = n_boot
        self.ci_quantiles = ci_quantiles
        self.ci_stages = ci_stages
        self.random_state = random_state
        self.thresholds = {k: float(v) for k, v in thresholds.items()}
        self.action = action
        self.min_group_size = min_group_size
        self.log_groups = log_groups
        self.batch_keys = batch_keys
        self.contract: Optional[BatchContract] = None
        self._state = FairnessState()
        self._capture = ForwardCapture()
        self._num_classes = 2
        self._names: dict[str, Optional[list[str]]] = {}
        self.results: dict[str, dict[str, Any]] = {}  # stage -> latest results
        self.history: list[dict[str, Any]] = []
        self.breaches: list[dict[str, Any]] = []
        self.files: dict[str, str] = {}
        self.figures: dict[str, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(entries=[entry_name(e) for e in self.entries], stages=self.stages)

    # hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.contract = BatchContract.resolve(self.batch_keys, trainer)
        self._names = {c: group_names(trainer, c) for c in self.columns}

    def _start(self, pl_module: pl.LightningModule) -> None:
        self._state.reset()
        self._state.to(pl_module.device)

    def _arm(self, pl_module: pl.LightningModule, batch: Any) -> None:
        assert self.contract is not None
        self._capture.arm(pl_module, batch_size_of(batch, self.contract))

    def _update(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        assert self.contract is not None
        preds = step_predictions(self._capture, self.contract, pl_module, batch, outputs, pl_module.trainer)
        y_true, y_pred, self._num_classes = hard_predictions(
            preds, self.contract.target(batch), self.activation, self.positive_label, self.threshold
        )
        codes = read_codes(self.contract, batch, self.columns, y_pred.device)
        self._state.update(y_true, y_pred, codes)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validation" in self.stages and not trainer.sanity_checking:
            self._start(pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if "validation" in self.stages and not trainer.sanity_checking:
            self._arm(pl_module, batch)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if "validation" in self.stages and not trainer.sanity_checking:
            self._update(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validation" in self.stages and not trainer.sanity_checking:
            self._finish(trainer, pl_module, "validation")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._start(pl_module)

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if "test" in self.stages:
            self._arm(pl_module, batch)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if "test" in self.stages:
            self._update(pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._finish(trainer, pl_module, "test")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validation" in self.results:
            self._save_files(trainer, artifact_dir(trainer, "fairness"), "validation")
        self._maybe_fail("validation")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.results:
            self._save_files(trainer, artifact_dir(trainer, "fairness"), "test")
        self._maybe_fail("test")

    # epoch end --------------------------------------------------------------------------------
    def compute(self, stage: Stage = "validation") -> dict[str, Any]:
        """Gather the epoch's samples (all ranks) and compute every entry's MetricFrame results."""
        y_true, y_pred, codes, _ = self._state.compute()
        return fairness_results(
            y_true.cpu().numpy(),
            y_pred.cpu().numpy(),
            codes.cpu().numpy(),
            self.entries,
            self.columns,
            self._names,
            self.metrics,
            num_classes=self._num_classes,
            n_boot=self.n_boot if stage in self.ci_stages else None,
            ci_quantiles=self.ci_quantiles,
            random_state=self.random_state,
            min_group_size=self.min_group_size,
        )

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._state.update_count == 0 and not _distributed():
            return
        results = self.compute(stage)  # identical on every rank: each rank decides the same
        results.update(stage=stage, epoch=int(trainer.current_epoch), step=int(trainer.global_step))
        self.results[stage] = results
        self.history.append(
            {"stage": stage, "epoch": results["epoch"], "step": results["step"], **{s: results[s] for s in SUMMARIES}}
        )
        self._log(trainer, pl_module, stage, results)
        if results["flags"]:
            first = results["flags"][0]
            rank_zero_warn(
                f"FairnessMetrics ({stage}): {len(results['flags'])} flagged group number(s), e.g. "
                f"{first['feature']} group {first['group']!r}: {first['metric']} ({first['reason']}). "
                "See report()['flags']."
            )
        self._check(trainer, stage, results)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, results: dict[str, Any]) -> None:
        # summaries through pl_module.log (monitorable by EarlyStopping/ModelCheckpoint); the many
        # per-group numbers in one log_metrics call per logger (pl_module.log costs ~0.3 ms a key)
        prefix = _PREFIX[stage]
        values: dict[str, float] = {f"{prefix}/{s}": results[s] for s in SUMMARIES}
        if len(self.entries) > 1:
            for name, part in results["by_feature"].items():
                values.update({f"{prefix}/{s}/{name}": part[s] for s in SUMMARIES})
        for key, value in values.items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=False)
        groups_log: dict[str, float] = {}
        if self.log_groups:
            for groups_or_classes in results["by_group"].values():
                per_class = groups_or_classes if results["num_classes"] > 2 else {"": groups_or_classes}
                for cls, groups in per_class.items():
                    suffix = f"/class={cls}" if cls else ""
                    for cell in groups.values():
                        for m in self.metrics:
                            groups_log[f"{prefix}/{m}/{cell['log_name']}{suffix}"] = float(cell[m])
        if groups_log and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(groups_log, step=trainer.global_step)

    def _check(self, trainer: pl.Trainer, stage: str, results: dict[str, Any]) -> None:
        for summary, limit in self.thresholds.items():
            value = results[summary]
            undefined = math.isnan(value)
            breached = undefined or (value < limit if is_ratio(summary) else value > limit)
            if not breached:
                continue
            breach = {
                "stage": stage,
                "epoch": results["epoch"],
                "step": results["step"],
                "summary": summary,
                "value": value,
                "limit": limit,
                "feature": results["worst_feature"].get(summary),
                "undefined": undefined,
            }
            self.breaches.append(breach)
            relation = "is undefined (NaN)" if undefined else f"= {value:.4f} {'<' if is_ratio(summary) else '>'} limit {limit}"
            message = f"Fairness limit breached ({stage}, epoch {results['epoch']}): {summary} {relation} (worst feature: {breach['feature']})."
            rank_zero_warn(message)
            if self.action == "stop" and stage == "validation":
                trainer.should_stop = True

    def _maybe_fail(self, stage: str) -> None:
        if self.action != "fail":
            return
        breaches = [b for b in self.breaches if b["stage"] == stage]
        if breaches:
            lines = "; ".join(f"{b['summary']}={b['value']:.4f} (limit {b['limit']}, epoch {b['epoch']})" for b in breaches)
            raise FairnessBreachError(
                f"FairnessMetrics(action='fail'): {len(breaches)} breach(es) during {stage}: {lines}. "
                "Mitigate (FairnessPenalty / ThresholdOptimizer) or revise `thresholds`."
            )

    # files ------------------------------------------------------------------------------------
    def _save_files(self, trainer: pl.Trainer, folder: Path, stage: str) -> None:
        # `folder` comes from every rank (trainer.log_dir broadcasts); the files from rank zero
        results = self.results[stage]
        path = folder / f"by_group_{stage}.csv"
        self.files[f"table_{stage}"] = str(path)
        for metric in self.metrics:
            if metric != "count":
                key = f"by_group_{metric}" if stage == "validation" else f"by_group_{metric}_test"
                self.figures[key] = str(folder / f"by_group_{metric}_{stage}.png")
        if trainer.is_global_zero:
            self._write_files(trainer, folder, stage, results)

    def _write_files(self, trainer: pl.Trainer, folder: Path, stage: str, results: dict[str, Any]) -> None:
        self._write_csv(folder / f"by_group_{stage}.csv", results)
        write_json(folder / f"fairness_{stage}.json", results)
        for metric in self.metrics:
            if metric != "count":
                fig_path = folder / f"by_group_{metric}_{stage}.png"
                save_figure(trainer, self._figure(results, metric, stage), fig_path, tag=f"{_PREFIX[stage]}/by_group_{metric}")

    def _rows(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        multiclass = results["num_classes"] > 2
        for name, groups_or_classes in results["by_group"].items():
            per_class = groups_or_classes if multiclass else {"": groups_or_classes}
            for cls, groups in per_class.items():
                overall = results["overall"][cls] if multiclass else results["overall"]
                for label, cell in list(groups.items()) + [("(overall)", {**overall, "count": None, "small": None})]:
                    row: dict[str, Any] = {"feature": name}
                    if multiclass:
                        row["class"] = cls
                    row.update(group=label, count=cell.get("count"), small=cell.get("small"))
                    for m in self.metrics:
                        if m == "count":
                            continue
                        row[m] = cell.get(m)
                        if f"{m}_ci" in cell:
                            lo_hi = cell.get(f"{m}_ci") or [None, None]
                            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo_hi
                    rows.append(row)
        return rows

    def _write_csv(self, path: Path, results: dict[str, Any]) -> None:
        rows = self._rows(results)
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def _figure(self, results: dict[str, Any], metric: str, stage: str) -> Any:
        entries = list(results["by_group"])
        figure = new_figure(figsize=(4.0 * len(entries) + 1, 3.6))
        multiclass = results["num_classes"] > 2
        for i, name in enumerate(entries):
            axis = figure.add_subplot(1, len(entries), i + 1)
            groups = results["by_group"][name]
            overall = results["overall"]
            title = name
            if multiclass:  # the class with the largest demographic parity difference
                cls = results["by_feature"][name]["worst_class"]["demographic_parity_difference"] or next(iter(groups))
                groups, overall, title = groups[cls], overall[cls], f"{name} (class {cls})"
            labels = list(groups)
            values = [groups[g][metric] for g in labels]
            colors = ["tab:orange" if groups[g]["small"] else "tab:blue" for g in labels]
            positions = np.arange(len(labels))
            axis.bar(positions, values, color=colors)
            if all(f"{metric}_ci" in groups[g] for g in labels):
                lows = [v - groups[g][f"{metric}_ci"][0] for g, v in zip(labels, values)]
                highs = [groups[g][f"{metric}_ci"][1] - v for g, v in zip(labels, values)]
                axis.errorbar(positions, values, yerr=[lows, highs], fmt="none", ecolor="black", capsize=3)
            axis.axhline(overall[metric], color="tab:red", linestyle="--", label=f"overall {overall[metric]:.3f}")
            axis.set_xticks(positions)
            axis.set_xticklabels(labels, rotation=45 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center", fontsize=7)
            axis.set_title(title, fontsize=9)
            axis.set_ylabel(metric)
            axis.legend(fontsize=7)
        figure.suptitle(f"{metric} by group ({stage}; orange: < {self.min_group_size} samples)", fontsize=10)
        return figure

    # report / checkpoint ----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The latest results (test if it ran after fit, else validation) plus breaches and history."""
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

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "history": self.history, "breaches": self.breaches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))
        self.breaches = list(state_dict.get("breaches", []))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
