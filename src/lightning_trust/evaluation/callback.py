"""``CrossDomainEvaluation``: per-domain metrics, worst domain, in-domain vs OOD gap, calibration and
corruption robustness for any Lightning run.

Its parts: :mod:`~lightning_trust.evaluation.arguments` (what the constructor refuses),
:mod:`~lightning_trust.evaluation.keys` (the declared logged and report keys),
:mod:`~lightning_trust.evaluation.domains` (which domains, each sample's domain, extra domains'
loaders), :mod:`~lightning_trust.evaluation.extra_passes` (the corrupted copies and extra domains),
:mod:`~lightning_trust.evaluation.results` (per-domain metrics, a pass's result, the corruption
summary), :mod:`~lightning_trust.evaluation.summary` (summaries and tables),
:mod:`~lightning_trust.evaluation.outputs` (logging, artifacts, the report) and
:mod:`~lightning_trust.evaluation.figures`.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, BatchKeyError, batch_size_of
from lightning_trust.core.budget import DEFAULT_MAX_OVERHEAD, OverheadBudget
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.capture import ForwardCapture, step_predictions
from lightning_trust.core.compat import Capability
from lightning_trust.core.output import artifact_dir
from lightning_trust.core.seam import trained_epoch
from lightning_trust.evaluation.arguments import check_arguments
from lightning_trust.evaluation.corruptions import SEVERITIES
from lightning_trust.evaluation.domains import DomainIndex, domain_names, in_domain_names, side_domains
from lightning_trust.evaluation.extra_passes import add_predictions, run_extra_passes
from lightning_trust.evaluation.figures import draw_figures, figure_paths
from lightning_trust.evaluation.keys import HISTORY_KEYS, LOGGED_KEYS, REPORT_KEYS
from lightning_trust.evaluation.outputs import log_result, report_of, table_paths, write_artifacts
from lightning_trust.evaluation.probe import Probed, check_setup
from lightning_trust.evaluation.results import (
    DomainMetrics,
    corruption_summary,
    load_baseline,
    pass_result,
    restrict_values,
    warn_gaps,
)
from lightning_trust.evaluation.schedule import evaluates, extra_due
from lightning_trust.evaluation.tokens import check_label_shift, label_shift

__all__ = ["CrossDomainEvaluation"]


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
        corruptions: ``"all"`` or a list of corruptions applied to the validation/test inputs as
            extra domains ``<corruption>_s<severity>``: image corruptions (``gaussian_noise``,
            ``shot_noise``, ``impulse_noise``, ``speckle_noise``, ``blur``, ``contrast``,
            ``brightness``, ``pixelate``, ``occlusion``) for images, text perturbations
            (``token_dropout``, ``word_swap``, ``char_noise``, :mod:`~lightning_trust.evaluation.text`)
            for token ids; ``"all"`` is the suite of the inputs' kind. Checked against the data at setup.
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
        max_overhead: the corrupted copies and extra domains cost at most this share of the fit's own
            time (:class:`~lightning_trust.core.budget.OverheadBudget`): a due validation pass skips
            them when they would exceed it (counted under ``overhead.skipped``); the last epoch's
            always runs. ``None``: every pass. Test passes are never skipped.
        tokenizer: for ``char_noise`` and the text vocabulary: an object with ``encode``/``decode``
            (default: ``datamodule.tokenizer``).
        label_shift: token-level targets: ``"auto"`` (1 when the labels are the input ids, the Hugging
            Face causal-LM convention; else 0), ``0`` or ``1``.
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
    logged_keys: ClassVar[dict[str, str]] = LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = REPORT_KEYS

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
        max_overhead: Optional[float] = DEFAULT_MAX_OVERHEAD,
        tokenizer: Any = None,
        label_shift: Union[Literal["auto"], int] = "auto",
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        self.budget = OverheadBudget(max_overhead)
        self.label_shift = check_label_shift(label_shift)
        self.corruptions, self.domains, self.specs, names = check_arguments(
            domain_key=domain_key, domain_values=domain_values, domains=domains, corruptions=corruptions,
            severities=severities, baseline_errors=baseline_errors, metrics=metrics, metric_args=metric_args,
            every_n_epochs=every_n_epochs, prediction_type=prediction_type, num_classes=num_classes,
            value_range=value_range, batch_size=batch_size, buffer_size=buffer_size,
        )  # fmt: skip
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
        self.max_overhead = self.budget.max_overhead
        self.tokenizer = tokenizer
        self.batch_keys = batch_keys
        self._corruption_arg = corruptions

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
        self._probed = Probed(list(self.corruptions), None, None)
        self._extra_due = True
        self._pass_seconds: list[float] = []  # each timed extra pass of the fit
        self._overhead: dict[str, Any] = self._account()

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
        self._probed = check_setup(
            trainer, pl_module, stage, self.contract, domain_key=self.domain_key, corruptions=self._corruption_arg,
            resolved=self.corruptions, tokenizer=self.tokenizer, shift_setting=self.label_shift,
        )  # fmt: skip
        self.corruptions = self._probed.corruptions
        self._resolve_domains(trainer)
        if self.baseline_errors is not None and self._baseline is None:
            self._baseline = load_baseline(self.baseline_errors)
        self._loaders = {}

    def _resolve_domains(self, trainer: pl.Trainer) -> None:
        """This run's domains, which are in-domain, and their metrics (kept, reset, across stages)."""
        if self.domain_key is not None:
            self._side_codes, self._side_names = side_domains(
                self.domain_key, self.domain_values, trainer, self.contract
            )
        self._index = DomainIndex(self._side_codes)
        extra = [str(n) for n in self.domains]
        names = domain_names(self._clean_names(), extra, self._corrupted_names())
        classes = self.num_classes
        datamodule = getattr(trainer, "datamodule", None)
        if classes is None and isinstance(getattr(datamodule, "num_classes", None), int):
            classes = int(datamodule.num_classes)  # type: ignore[union-attr]
        if self._metrics is None or names != self._names:  # kept (and reset) across stages otherwise
            self._metrics = DomainMetrics(names, self.specs, self.buffer_size, classes)
        elif classes is not None:
            self._metrics.num_classes = self._metrics.num_classes or classes
        self._metrics.reset()
        self._names = names
        self._in_names = in_domain_names(
            self.in_domain, names, self._side_codes, self._side_names, extra, self.domain_key, self.base_domain,
            other_sources=bool(self.corruptions),
        )  # fmt: skip

    def _clean_names(self) -> list[str]:
        """The domains of the validation/test data itself: the side-column values, or ``base_domain``."""
        return list(self._side_names) if self.domain_key else [self.base_domain]

    def _corrupted_names(self) -> list[str]:
        return [f"{c}_s{s}" for c in self.corruptions for s in self.severities]

    # hooks ------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.start()

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
        self._overhead = self._account()  # the fit's account (the clock would run on after it)
        if self.figures and RunningStage.VALIDATING.value in self.results:
            self._write_figures(trainer, RunningStage.VALIDATING)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._capture.disarm()

    # the pass ---------------------------------------------------------------------------------
    def _start(self, stage: RunningStage, trainer: pl.Trainer) -> None:
        self._active = evaluates(trainer, stage, self.every_n_epochs)
        if self._metrics is not None:
            self._metrics.reset()
        has_extra = bool(self.corruptions or self.domains)
        self._extra_due = has_extra and self._active and extra_due(self.budget, trainer)

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
        target = torch.as_tensor(self.contract.target(batch), device=preds.device)
        if self._probed.shift is None:  # no sample at setup: decided on the first batch
            self._probed.shift = label_shift(self.label_shift, self.contract.inputs(batch), target)
        if self.domain_key is not None:
            index = self._index(self.contract.side(batch, self.domain_key), preds.device)
        else:
            index = torch.zeros(len(target), dtype=torch.long, device=preds.device)
        add_predictions(self._metrics, preds, target, index, self._probed.shift, self.prediction_type)

    def _extra_passes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage) -> None:
        """The corrupted copies of the stage's batches (the loader read again) and the extra domains."""
        assert self._metrics is not None
        first = self._names.index(self._corrupted_names()[0]) if self.corruptions else 0
        run_extra_passes(
            self._metrics, pl_module, trainer, stage == RunningStage.TESTING, self.contract, self._names, self._loaders,
            corruptions=self.corruptions, severities=self.severities, first=first, seed=self.seed,
            value_range=self.value_range, prediction_type=self.prediction_type, vocabulary=self._probed.vocabulary,
            shift=self._probed.shift, domains=self.domains, batch_size=self.batch_size,
        )  # fmt: skip

    # epoch end --------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage) -> None:
        assert self._metrics is not None
        extra = bool(self.corruptions or self.domains)
        if self._extra_due:
            fitting, before = trainer.state.fn == TrainerFn.FITTING, self.budget.spent
            with self.budget.timed() if fitting else contextlib.nullcontext():
                self._extra_passes(trainer, pl_module, stage)
            if fitting:
                self._pass_seconds.append(self.budget.spent - before)
        values = self._metrics.compute(trainer.strategy, trainer.world_size, pl_module.device)
        names = self._names if self._extra_due or not extra else self._clean_names()
        values = restrict_values(values, names)
        warn_gaps(self, values, names, stage.value, self.domain_key, self._side_names)
        result = pass_result(
            values, stage.value, trained_epoch(trainer), int(trainer.global_step), self.metric_names,
            names, [n for n in self._in_names if n in names],
        )  # fmt: skip
        result["extra_passes"] = "none" if not extra else ("run" if self._extra_due else "skipped")
        if trainer.state.fn == TrainerFn.FITTING:
            self._overhead = self._account()
        if self.corruptions and self._extra_due:
            result.update(corruption_summary(
                values.per_domain, values.sizes, self._clean_names(), self.corruptions, self.severities, self._baseline
            ))  # fmt: skip
        self.results[stage.value] = result
        if stage == RunningStage.VALIDATING:
            self.history.append({k: result[k] for k in HISTORY_KEYS})
        log_result(trainer, result)
        # `trainer.log_dir` is a collective under DDP: every process asks, only rank zero writes
        folder = artifact_dir(trainer, "evaluation")
        result["tables"] = table_paths(folder, stage.value, result)
        write_artifacts(folder, stage.value, result, self.metric_names, self._in_names)

    # output -----------------------------------------------------------------------------------
    def _write_figures(self, trainer: pl.Trainer, stage: RunningStage) -> None:
        folder = artifact_dir(trainer, "evaluation")  # on every process (a collective under DDP)
        suffix = "" if stage == RunningStage.VALIDATING else "_test"
        result = self.results[stage.value]
        self._figures.update(figure_paths(folder, result, self.metric_names, suffix))
        draw_figures(trainer, folder, result, self.metric_names, self._in_names, suffix)

    # report and checkpoint --------------------------------------------------------------------
    def _account(self) -> dict[str, Any]:
        return {**self.budget.summary(), "pass_seconds": list(self._pass_seconds)}

    def report(self) -> dict[str, Any]:
        """The latest evaluation (test when run, else the last validation) as plain JSON (see
        :attr:`report_keys`), figures under ``"figures"``."""
        report = report_of(self.results, self.history, self._figures, self.metric_names, self.domain_key)
        if report["evaluated"]:
            report["overhead"] = dict(self._overhead)
        return report

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "history": self.history, "figures": self._figures,
                "budget": self.budget.state_dict(), "pass_seconds": self._pass_seconds}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))
        self._figures = dict(state_dict.get("figures", {}))
        if "budget" in state_dict:
            self.budget.load_state_dict(state_dict["budget"])
        self._pass_seconds = list(state_dict.get("pass_seconds", []))
