"""``CrossDomainEvaluation``: per-domain metrics, worst domain, in-domain vs OOD gap, calibration and
corruption robustness for any Lightning run.

Its parts: :mod:`~lightning_trust.evaluation.domains` (which domains, each sample's domain, extra
domains' loaders), :mod:`~lightning_trust.evaluation.results` (per-domain metrics and the
corruption summary), :mod:`~lightning_trust.evaluation.summary` (summaries and tables) and
:mod:`~lightning_trust.evaluation.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, BatchKeyError, batch_size_of, call_module, logits_of
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.capture import ForwardCapture, step_predictions
from lightning_trust.core.compat import Capability
from lightning_trust.core.output import artifact_dir, warn_once, write_json
from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.tensors import to_jsonable
from lightning_trust.evaluation.corruptions import SEVERITIES, corrupt, resolve_corruptions
from lightning_trust.evaluation.domains import (
    DomainIndex,
    extra_domain_loader,
    in_domain_names,
    safe_name,
    side_domains,
)
from lightning_trust.evaluation.figures import draw_figures, figure_paths
from lightning_trust.evaluation.metrics import MetricSpec, to_probabilities
from lightning_trust.evaluation.results import DomainMetrics, corruption_summary, load_baseline
from lightning_trust.evaluation.summary import summarize, write_tables

__all__ = ["CrossDomainEvaluation"]

#: The summaries logged as ``domain/summary/<summary>/<metric>``.
LOGGED_SUMMARIES: tuple[str, ...] = ("average", "weighted_average", "worst", "in_domain", "ood", "ood_gap")
#: The keys of a pass's result that the report shows, in order.
REPORTED: tuple[str, ...] = (
    "stage", "epoch", "metrics", "domains", "in_domain_domains", "ood_domains", "sizes", "empty_domains",
    "unlisted_samples", "per_domain", "average", "weighted_average", "worst", "worst_domain", "best", "best_domain",
    "in_domain", "in_domain_weighted", "ood", "ood_weighted", "ood_gap", "corruption_error",
    "relative_corruption_error", "corruption", "tables",
)  # fmt: skip


class CrossDomainEvaluation(TrustCallback):
    """Evaluate the model per domain, WILDS/ImageNet-C style, during validation and test.

    Domains come from a side column of the batch contract (``domain_key``, e.g. Adult's
    ``native_region``), from extra named datasets/dataloaders (``domains``), and from a suite of
    image ``corruptions`` applied to the validation/test inputs at several severities. Every
    metric is a torchmetrics object per domain (states reduced across processes under DDP);
    predictions are buffered on the device and each domain's metrics are updated once per
    ``buffer_size`` samples, so no step waits on the host.

    Logged: ``domain/<name>/<metric>`` and ``domain/summary/<summary>/<metric>`` (``average``,
    ``weighted_average``, ``worst``, ``in_domain``, ``ood``, ``ood_gap``), plus
    ``domain/summary/corruption_error`` and ``relative_corruption_error`` with corruptions. Files in
    ``<log_dir>/lightning_trust/evaluation``: ``domains_<stage>.csv``/``.md``, a bar chart per
    metric (``domain_<metric>.png``) and a reliability diagram per domain with ``"ece"``.

    Args:
        domain_key: side column naming each sample's domain (read with the batch contract).
        in_domain: which domains are in-distribution: names (``"United-States"``) or column codes
            (``0``), or names of extra domains. Default: the side-column domains when other sources
            exist; with no ``domain_key``, the validation data (``base_domain``).
        domain_values: the column values to evaluate, in order (default: every value of
            ``datamodule.categories[domain_key]``, else the values found in the validation set).
        domains: extra domains ``{name: source}``; a source is a ``Dataset``, a ``DataLoader``, a
            callable returning one, or (YAML) the name of a DataModule/LightningModule attribute or
            method such as ``"test_dataloader"``. Evaluated with the module's own forward.
        corruptions: ``"all"`` or a list of image corruptions (``gaussian_noise``, ``shot_noise``,
            ``impulse_noise``, ``speckle_noise``, ``blur``, ``contrast``, ``brightness``,
            ``pixelate``, ``occlusion``) applied to the validation/test inputs as extra domains
            ``<corruption>_s<severity>``.
        severities: corruption severities (1-5).
        baseline_errors: JSON file of a baseline model's errors (the ``corruption_errors_<stage>.json``
            this callback writes) to normalize the corruption error (ImageNet-C's mCE).
        metrics: short names (``accuracy``, ``f1``, ``auroc``, ``nll``, ``ece``, ``brier``) or
            torchmetrics class paths.
        metric_args: extra init arguments per metric name, e.g. ``{"ece": {"n_bins": 10}}``.
        every_n_epochs: evaluate on every n-th validation epoch (and always at the last one and at test).
        base_domain: name of the validation/test data as a domain when there is no ``domain_key``.
        prediction_type: whether predictions are ``"logits"`` (softmax/sigmoid applied) or ``"probs"``.
        num_classes: number of classes (default: ``datamodule.num_classes``, else the predictions' width).
        value_range: range of image values the corruptions assume (inputs are clipped to it).
        batch_size: batch size for extra domain datasets (default: the DataModule's, else 256).
        buffer_size: predictions kept on the device before the per-domain metric update.
        figures: write the bar charts and reliability diagrams (at the end of fit and of test).
        seed: seed of the corruption noise (each batch and corruption gets its own generator).
        batch_keys: batch contract overrides (``{"input": ..., "target": ..., domain_key: ...}``).
        name: the report section (default ``"evaluation"``); give two evaluations distinct names.

    Example:
        >>> evaluation = CrossDomainEvaluation(domain_key="native_region", in_domain=["United-States"],
        ...                                    metrics=["accuracy", "ece"])
        >>> evaluation.report()
        {'evaluated': False, 'metrics': ['accuracy', 'ece'], 'figures': {}}
        >>> Capability.EXTRA_PASSES in CrossDomainEvaluation(corruptions=["blur"]).capabilities
        True
        >>> from lightning_trust.demo import AdultDataModule, TabularMLP
        >>> trainer = pl.Trainer(callbacks=[evaluation])
        >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
        >>> evaluation.report()["ood_gap"]["accuracy"]  # doctest: +SKIP
    """

    report_section = "evaluation"
    logged_keys: ClassVar[dict[str, str]] = {
        "domain/<domain>/<metric>": "a metric on one domain (the name made safe for keys and files)",
        "domain/summary/<summary>/<metric>": (
            "a summary over the domains: average, weighted_average, worst, in_domain, ood or ood_gap"
        ),
        "domain/summary/corruption_error": "mean corruption error over the corruptions (ImageNet-C's CE/mCE)",
        "domain/summary/relative_corruption_error": "mean relative corruption error (error increase over clean)",
    }
    report_keys: ClassVar[dict[str, str]] = {
        "evaluated": "whether a pass has run",
        "domain_key": "the side column naming each sample's domain (null without one)",
        "stage": "the pass reported: 'test' when run, else the last 'validate'",
        "epoch": "epoch of that pass",
        "metrics": "the metric names",
        "domains": "every evaluated domain, in order",
        "in_domain_domains": "the in-distribution domains",
        "ood_domains": "the out-of-distribution domains",
        "sizes": "samples per domain",
        "empty_domains": "domains without samples in the pass (their metrics are null)",
        "unlisted_samples": "samples whose domain value is not evaluated",
        "per_domain": "{domain: {metric: value}}",
        "average": "unweighted mean over the domains, per metric",
        "weighted_average": "mean weighted by domain size, per metric",
        "worst": "the worst domain's value, per metric",
        "worst_domain": "the worst domain, per metric",
        "best": "the best domain's value, per metric",
        "best_domain": "the best domain, per metric",
        "in_domain": "unweighted mean over the in-domain domains, per metric",
        "in_domain_weighted": "size-weighted mean over the in-domain domains, per metric",
        "ood": "unweighted mean over the out-of-domain domains, per metric",
        "ood_weighted": "size-weighted mean over the out-of-domain domains, per metric",
        "ood_gap": "how much worse out of domain than in domain, per metric (positive: worse)",
        "corruption_error": "mean corruption error (with corruptions)",
        "relative_corruption_error": "mean relative corruption error (with corruptions)",
        "corruption": "clean error, errors per corruption and severity, CE per corruption (with corruptions)",
        "tables": "paths of the CSV/Markdown tables (and corruption errors JSON) of the pass",
        "validation": "the last validation pass's summaries, when the report shows a test pass",
        "history": "one summary per validation pass: epoch, step, average, worst, worst_domain, ood_gap",
    }

    def __init__(
        self,
        domain_key: Optional[str] = None,
        in_domain: Optional[list[Union[str, int]]] = None,
        domain_values: Optional[list[Union[str, int]]] = None,
        domains: Optional[dict[str, Any]] = None,
        corruptions: Union[str, list[str], None] = None,
        severities: list[int] = list(SEVERITIES),  # noqa: B006 - jsonargparse shows the default
        baseline_errors: Optional[str] = None,
        metrics: list[str] = ["accuracy", "nll", "ece"],  # noqa: B006
        metric_args: Optional[dict[str, dict[str, Any]]] = None,
        every_n_epochs: int = 1,
        base_domain: str = "clean",
        prediction_type: Literal["logits", "probs"] = "logits",
        num_classes: Optional[int] = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        batch_size: Optional[int] = None,
        buffer_size: int = 8192,
        figures: bool = True,
        seed: int = 0,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        if domain_key is not None and (not isinstance(domain_key, str) or not domain_key):
            raise ValueError(f"`domain_key` must be a side-column name, got {domain_key!r}.")
        self.corruptions = resolve_corruptions(corruptions)
        if domains is not None and not isinstance(domains, Mapping):
            raise ValueError(
                f"`domains` must map a domain name to a dataset, dataloader or method name, got {domains!r}."
            )
        self.domains = dict(domains or {})
        if domain_key is None and not self.domains and not self.corruptions:
            raise ValueError(
                "CrossDomainEvaluation has no domains: set `domain_key` (a side column such as 'native_region'), "
                "`domains` (extra datasets) or `corruptions`."
            )
        if domain_key is None and domain_values is not None:
            raise ValueError("`domain_values` needs a `domain_key` to read them from.")
        if (
            not isinstance(severities, (list, tuple))
            or not severities
            or any(not isinstance(s, int) or not 1 <= s <= 5 for s in severities)
        ):
            raise ValueError(f"`severities` must be a non-empty list of ints in 1..5, got {severities!r}.")
        if len(set(severities)) != len(severities):
            raise ValueError(f"`severities` lists a severity twice: {severities}.")
        if baseline_errors is not None and not self.corruptions:
            raise ValueError("`baseline_errors` normalizes the corruption error; set `corruptions` too.")
        if not isinstance(metrics, (list, tuple)) or not metrics:
            raise ValueError(f"`metrics` must be a non-empty list of metric names, got {metrics!r}.")
        metric_args = dict(metric_args or {})
        unknown_args = [k for k in metric_args if k not in metrics]
        if unknown_args:
            raise ValueError(f"`metric_args` names metrics not in `metrics` {list(metrics)}: {unknown_args}.")
        metric_list = list(metrics)
        if self.corruptions and "accuracy" not in metric_list:
            metric_list.append("accuracy")  # the corruption error is 1 - accuracy
        self.specs = [MetricSpec.from_name(m, metric_args.get(m)) for m in metric_list]
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"`metrics` has two metrics with one name: {names}.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}.")
        if prediction_type not in ("logits", "probs"):
            raise ValueError(f"`prediction_type` must be 'logits' or 'probs', got {prediction_type!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"`value_range` must be (low, high) with low < high, got {value_range!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"`buffer_size` must be a positive integer, got {buffer_size!r}.")
        self.domain_key = domain_key
        self.in_domain = list(in_domain) if in_domain is not None else None
        self.domain_values = list(domain_values) if domain_values is not None else None
        self.severities = list(severities)
        self.baseline_errors = baseline_errors
        self.metric_names = names
        self.every_n_epochs = every_n_epochs
        self.base_domain = base_domain
        self.prediction_type = prediction_type
        self.num_classes = num_classes
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.figures = figures
        self.seed = seed
        self.batch_keys = batch_keys

        self.contract = BatchContract()
        self.results: dict[str, dict[str, Any]] = {}  # stage -> latest evaluation
        self.history: list[dict[str, Any]] = []  # one summary per validation evaluation
        self._figures: dict[str, str] = {}
        self._baseline: Optional[dict[str, Any]] = None
        # set up per run
        self._names: list[str] = []
        self._side_names: list[str] = []
        self._side_codes: list[Union[int, float, str]] = []
        self._in_names: list[str] = []
        self._metrics: Optional[DomainMetrics] = None
        self._index = DomainIndex([])
        self._active = False
        self._capture = ForwardCapture()
        self._loaders: dict[str, Any] = {}

    @property
    def capabilities(self) -> frozenset[Capability]:  # type: ignore[override]  # depends on the arguments
        """``EXTRA_PASSES`` when corrupted copies or extra domains are evaluated (the clean domains
        reuse the step's own forward)."""
        return frozenset({Capability.EXTRA_PASSES}) if (self.corruptions or self.domains) else frozenset()

    # setup ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.contract = BatchContract.resolve(self.batch_keys, trainer)
        datamodule = getattr(trainer, "datamodule", None)
        classes = self.num_classes
        if classes is None and isinstance(getattr(datamodule, "num_classes", None), int):
            classes = int(datamodule.num_classes)  # type: ignore[union-attr]
        if self.domain_key is not None:
            self._side_codes, self._side_names = side_domains(
                self.domain_key, self.domain_values, trainer, self.contract
            )
        self._index = DomainIndex(self._side_codes)
        extra = [str(n) for n in self.domains]
        names = self._clean_names() + extra + self._corrupted_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Domain names must be unique; {duplicates} appear twice. Rename the extra `domains`.")
        if self._metrics is None or names != self._names:  # kept (and reset) across stages otherwise
            self._metrics = DomainMetrics(names, self.specs, self.buffer_size, classes)
        elif classes is not None:
            self._metrics.num_classes = self._metrics.num_classes or classes
        self._names = names
        self._in_names = in_domain_names(
            self.in_domain, names, self._side_codes, self._side_names, extra, self.domain_key, self.base_domain,
            other_sources=bool(self.corruptions),
        )  # fmt: skip
        if self.baseline_errors is not None and self._baseline is None:
            self._baseline = load_baseline(self.baseline_errors)
        self._loaders = {}
        self._metrics.reset()

    def _clean_names(self) -> list[str]:
        """The domains of the validation/test data itself: the side-column values, or ``base_domain``."""
        return list(self._side_names) if self.domain_key else [self.base_domain]

    def _corrupted_names(self) -> list[str]:
        return [f"{c}_s{s}" for c in self.corruptions for s in self.severities]

    # hooks ------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(RunningStage.VALIDATING, trainer)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(RunningStage.TESTING, trainer)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._arm(pl_module, batch, dataloader_idx)

    @override
    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._arm(pl_module, batch, dataloader_idx)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, pl_module, RunningStage.VALIDATING)
        self._active = False

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, pl_module, RunningStage.TESTING)
            if self.figures:
                self._write_figures(trainer, RunningStage.TESTING)
        self._active = False

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.figures and RunningStage.VALIDATING.value in self.results:
            self._write_figures(trainer, RunningStage.VALIDATING)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._capture.disarm()

    # the pass ---------------------------------------------------------------------------------
    def _should_skip(self, trainer: pl.Trainer, stage: RunningStage) -> bool:
        """The one skip rule, decided at the start of each pass: never at test or in a standalone
        ``trainer.validate``; during fit, the sanity check and the validation epochs that
        ``every_n_epochs`` does not select (the last epoch always runs)."""
        if stage == RunningStage.TESTING or trainer.state.fn == TrainerFn.VALIDATING:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return trainer.sanity_checking or not (epoch % self.every_n_epochs == 0 or last)

    def _start(self, stage: RunningStage, trainer: pl.Trainer) -> None:
        self._active = not self._should_skip(trainer, stage)
        if self._metrics is not None:
            self._metrics.reset()

    def _arm(self, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        """Keep the output of the step's own forward call, so the clean domain costs no extra pass."""
        if not self._active or dataloader_idx != 0:
            self._capture.disarm()
            return
        try:
            size = batch_size_of(batch, self.contract)
        except BatchKeyError:
            size = None
        self._capture.arm(pl_module, size)

    def _check_domain_column(self, batch: Any) -> None:
        """Fail early (also during the sanity check) with the keys the batch has."""
        if self.domain_key is not None and not self.contract.has_side(batch, self.domain_key):
            try:
                self.contract.side(batch, self.domain_key)
            except BatchKeyError as err:
                raise BatchKeyError(f"CrossDomainEvaluation(domain_key={self.domain_key!r}): {err}") from None

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int, dataloader_idx: int) -> None:  # fmt: skip
        if dataloader_idx != 0:
            self._capture.disarm()
            return
        self._check_domain_column(batch)
        if not self._active:
            self._capture.disarm()
            return
        assert self._metrics is not None
        preds = step_predictions(self._capture, self.contract, pl_module, batch, outputs, trainer)
        probs = to_probabilities(preds, self.prediction_type)
        target = torch.as_tensor(self.contract.target(batch), device=probs.device).reshape(-1)
        if self.domain_key is not None:
            index = self._index(self.contract.side(batch, self.domain_key), probs.device)
        else:
            index = torch.zeros(len(target), dtype=torch.long, device=probs.device)
        self._metrics.add(probs, target, index)
        if self.corruptions:
            self._corrupted(trainer, pl_module, self.contract.inputs(batch), target, batch_idx)

    def _corrupted(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Any, target: Tensor,
                   batch_idx: int) -> None:  # fmt: skip
        """The batch under each corruption and severity, as the domains ``<corruption>_s<severity>``."""
        assert self._metrics is not None
        first = self._names.index(self._corrupted_names()[0])
        with isolated_eval(pl_module, trainer) as module:
            for ci, name in enumerate(self.corruptions):
                for si, severity in enumerate(self.severities):
                    generator = torch.Generator(device=inputs.device if isinstance(inputs, Tensor) else "cpu")
                    generator.manual_seed(
                        (self.seed * 1_000_003 + trainer.global_rank * 100_003 + batch_idx * 1009 + ci * 17 + severity)
                        % (2**63)
                    )
                    x = corrupt(inputs, name, severity, generator, self.value_range)
                    probs = to_probabilities(logits_of(call_module(module, x)), self.prediction_type)
                    d = first + ci * len(self.severities) + si
                    self._metrics.add(probs, target, torch.full_like(target, d, dtype=torch.long))

    def _evaluate_extra_domains(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._metrics is not None
        for name, source in self.domains.items():
            if name not in self._loaders:
                self._loaders[name] = extra_domain_loader(name, source, trainer, pl_module, self.batch_size)
            d = self._names.index(str(name))
            with isolated_eval(pl_module, trainer) as module:
                for batch in self._loaders[name]:
                    batch = trainer.strategy.batch_to_device(batch)
                    probs = to_probabilities(self.contract.predictions(module, batch), self.prediction_type)
                    target = torch.as_tensor(self.contract.target(batch), device=probs.device).reshape(-1).long()
                    self._metrics.add(probs, target, torch.full_like(target, d))

    # epoch end --------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage) -> None:
        assert self._metrics is not None
        self._evaluate_extra_domains(trainer, pl_module)
        values = self._metrics.compute(trainer.strategy, trainer.world_size, pl_module.device)
        sizes, per_domain = values.sizes, values.per_domain
        empty = [n for n in self._names if sizes[n] == 0]
        if empty:
            warn_once(self, f"empty {empty}", (
                f"CrossDomainEvaluation: domain(s) {empty} had no samples in this {stage.value} pass; their metrics "
                "are left out of the summaries (reported as null, listed under `empty_domains`)."
            ))  # fmt: skip
        if values.unlisted:
            warn_once(self, "unlisted", (
                f"CrossDomainEvaluation: {values.unlisted} samples had a {self.domain_key!r} value outside the "
                f"evaluated domains {self._side_names}; add the value to `domain_values` to evaluate it (the count "
                "of each pass is reported as `unlisted_samples`)."
            ))  # fmt: skip
        result: dict[str, Any] = {
            "stage": stage.value,
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
            "metrics": list(self.metric_names),
            "domains": list(self._names),
            "in_domain_domains": [n for n in self._names if n in self._in_names],
            "ood_domains": [n for n in self._names if n not in self._in_names],
            "sizes": sizes,
            "empty_domains": empty,
            "unlisted_samples": values.unlisted,
            "per_domain": per_domain,
            **summarize(per_domain, sizes, values.directions, self._in_names),
            "reliability": values.reliability,
        }
        if self.corruptions:
            result.update(corruption_summary(
                per_domain, sizes, self._clean_names(), self.corruptions, self.severities, self._baseline
            ))  # fmt: skip
        self.results[stage.value] = result
        if stage == RunningStage.VALIDATING:
            self.history.append(
                {k: result[k] for k in ("epoch", "step", "average", "worst", "worst_domain", "ood_gap")}
            )
        self._log(trainer, result)
        # `trainer.log_dir` is a collective under DDP: every process asks, only rank zero writes
        folder = artifact_dir(trainer, "evaluation")
        result["tables"] = {"csv": str(folder / f"domains_{stage.value}.csv"),
                            "markdown": str(folder / f"domains_{stage.value}.md")}  # fmt: skip
        if "corruption" in result:
            result["tables"]["corruption_errors"] = str(folder / f"corruption_errors_{stage.value}.json")
        self._write_tables(folder, stage.value, result)

    # output -----------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, result: dict[str, Any]) -> None:
        values: dict[str, float] = {}
        for name, metrics in result["per_domain"].items():
            for metric, value in metrics.items():
                if value is not None:
                    values[f"domain/{safe_name(name)}/{metric}"] = value
        for key in LOGGED_SUMMARIES:
            for metric, value in result.get(key, {}).items():
                if value is not None:
                    values[f"domain/summary/{key}/{metric}"] = value
        for key in ("corruption_error", "relative_corruption_error"):
            if key in result and not math.isnan(result[key]):
                values[f"domain/summary/{key}"] = result[key]
        if not values:
            return
        # Every process holds the same synced numbers, so they go straight to the loggers (rank zero)
        # and to `callback_metrics` on every process (for ModelCheckpoint/EarlyStopping monitors, which
        # must agree across processes): `self.log` would build a reducing result object per key, costing
        # more than the whole evaluation.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        self._log_to_loggers(trainer, values)

    @staticmethod
    @rank_zero_only
    def _log_to_loggers(trainer: pl.Trainer, values: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    @rank_zero_only
    def _write_tables(self, folder: Path, stage: str, result: dict[str, Any]) -> None:
        write_tables(folder / f"domains_{stage}", result["per_domain"], result["sizes"], self.metric_names,
                     self._in_names, result)  # fmt: skip
        if "corruption" in result:
            write_json(folder / f"corruption_errors_{stage}.json", result["corruption"])

    def _write_figures(self, trainer: pl.Trainer, stage: RunningStage) -> None:
        folder = artifact_dir(trainer, "evaluation")  # on every process (a collective under DDP)
        suffix = "" if stage == RunningStage.VALIDATING else "_test"
        result = self.results[stage.value]
        self._figures.update(figure_paths(folder, result, self.metric_names, suffix))
        draw_figures(trainer, folder, result, self.metric_names, self._in_names, suffix)

    # report and checkpoint --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The latest evaluation (test when run, else the last validation) as plain JSON (see
        :attr:`report_keys`), figures under ``"figures"``."""
        test, validate = RunningStage.TESTING.value, RunningStage.VALIDATING.value
        stage = test if test in self.results else validate
        if stage not in self.results:
            return {"evaluated": False, "metrics": list(self.metric_names), "figures": dict(self._figures)}
        result = self.results[stage]
        out: dict[str, Any] = {"evaluated": True, "domain_key": self.domain_key}
        out.update({k: result[k] for k in REPORTED if k in result})
        if stage == test and validate in self.results:
            val = self.results[validate]
            out["validation"] = {k: val[k] for k in ("epoch", "per_domain", "average", "worst", "ood_gap") if k in val}
        out["history"] = list(self.history)
        out["figures"] = dict(self._figures)
        return dict(to_jsonable(out, strict=True))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "history": self.history, "figures": self._figures}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))
        self._figures = dict(state_dict.get("figures", {}))
