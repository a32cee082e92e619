"""``CrossDomainEvaluation``: per-domain metrics, worst domain, in-domain vs OOD gap, calibration and
corruption robustness for any Lightning run.

Its parts: :mod:`~lightning_trust.evaluation.arguments` (what the constructor refuses),
:mod:`~lightning_trust.evaluation.keys` (the declared logged and report keys),
:mod:`~lightning_trust.evaluation.domain_pass` (this run's domains, the stage's own batches scored),
:mod:`~lightning_trust.evaluation.domains` (which domains, each sample's domain, extra domains'
loaders), :mod:`~lightning_trust.evaluation.extra_passes` (the corrupted copies and extra domains),
:mod:`~lightning_trust.evaluation.results` (per-domain metrics, a pass's result, the corruption
summary), :mod:`~lightning_trust.evaluation.summary` (summaries and tables),
:mod:`~lightning_trust.evaluation.outputs` (logging, artifacts, the report) and
:mod:`~lightning_trust.evaluation.figures`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from typing_extensions import override

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.budget import DEFAULT_MAX_OVERHEAD
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.capture import ForwardCapture
from lightning_trust.core.compat import Capability
from lightning_trust.core.output import DeferredFigures, artifact_dir
from lightning_trust.core.seam import state_key_of, trained_epoch
from lightning_trust.evaluation.arguments import check_arguments
from lightning_trust.evaluation.corruptions import DEFAULT_SEVERITIES
from lightning_trust.evaluation.domain_pass import DomainPass
from lightning_trust.evaluation.domains import DomainIndex
from lightning_trust.evaluation.extra_passes import run_extra_passes
from lightning_trust.evaluation.figures import defer_figures
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
from lightning_trust.evaluation.schedule import ExtraPassBudget, evaluates
from lightning_trust.evaluation.subset import SUBSET, extra_samples
from lightning_trust.evaluation.tokens import check_label_shift
from lightning_trust.fairness.metrics_args import check_figures

__all__ = ["CrossDomainEvaluation"]


class CrossDomainEvaluation(DomainPass, TrustCallback):
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
        severities: corruption severities (1-5). Default ``[1, 3, 5]``: the mildest, the middle and the
            strongest of ImageNet-C's five at 3/5 of the cost (each severity is a forward pass of every
            batch per corruption); ``[1, 2, 3, 4, 5]`` for ImageNet-C's average over all five.
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
        figures: the bar charts and reliability diagrams of the last validation and the test pass:
            ``True`` / ``"report"``: drawn when :meth:`report` is first read (e.g. by ``TrustReport``;
            never during fit), ``"stage_end"``: at the end of fit and of test, ``False`` / ``"never"``.
        seed: seed of the corruption noise (each batch and corruption gets its own generator).
        max_overhead: the corrupted copies and extra domains cost at most this share of the fit's own
            time (:class:`~lightning_trust.core.budget.OverheadBudget`): each source times its first
            batch and evaluates as many batches as the budget affords (the same batches under every
            corruption and severity; the last epoch's pass at least one batch and 64 samples); a due
            validation pass that cannot afford that and as much again for the last one skips them
            (counted under ``overhead.skipped``); ``extra_samples`` says what each pass evaluated.
            ``None``: every batch of every pass. Test passes are never cut or skipped.
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
        severities: list[int] = list(DEFAULT_SEVERITIES),  # noqa: B006 - jsonargparse shows the default
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
        figures: Union[bool, Literal["report", "stage_end", "never"]] = True,
        seed: int = 0,
        max_overhead: Optional[float] = DEFAULT_MAX_OVERHEAD,
        tokenizer: Any = None,
        label_shift: Union[Literal["auto"], int] = "auto",
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        self._passes = ExtraPassBudget(max_overhead)
        self.budget = self._passes.budget
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
        self.figures = check_figures("report" if figures is True else "never" if figures is False else figures)
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
        self._overhead: dict[str, Any] = self._passes.account()
        self._owed = DeferredFigures()  # the figures, drawn when the report is read
        self._rows = 0  # samples of dataloader 0 this process evaluated in the pass (what the corruptions may cut)

    @property
    def state_key(self) -> str:
        """Distinct per ``name``: two evaluations in one Trainer each keep their own checkpoint state."""
        return state_key_of(self, name=self.name) if self.name else super().state_key

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
            self._write_figures(trainer, RunningStage.TESTING)
        self._active = False

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._overhead = self._passes.account()  # the fit's account (the clock would run on after it)
        if RunningStage.VALIDATING.value in self.results:
            self._write_figures(trainer, RunningStage.VALIDATING)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._capture.disarm()

    # the pass ---------------------------------------------------------------------------------
    def _start(self, stage: RunningStage, trainer: pl.Trainer) -> None:
        self._active = evaluates(trainer, stage, self.every_n_epochs)
        if self._metrics is not None:
            self._metrics.reset()
        self._rows = 0

    def _extra_passes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage) -> dict[str, Any]:
        """The corrupted copies of the stage's batches (the loader read again) and the extra domains,
        cut to the budget during fit."""
        assert self._metrics is not None
        first = self._names.index(self._corrupted_names()[0]) if self.corruptions else 0
        subset = len(self._names) if self.corruptions else None  # the hidden domain after the reported ones
        with self._passes.timed(trainer) as sizer:
            done = run_extra_passes(
            self._metrics, pl_module, trainer, stage == RunningStage.TESTING, self.contract, self._names, self._loaders,
            corruptions=self.corruptions, severities=self.severities, first=first, seed=self.seed,
            value_range=self.value_range, prediction_type=self.prediction_type, vocabulary=self._probed.vocabulary,
            shift=self._probed.shift, domains=self.domains, batch_size=self.batch_size, sizer=sizer, subset=subset,
            )  # fmt: skip
        return done

    # epoch end --------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage) -> None:
        assert self._metrics is not None
        extra = bool(self.corruptions or self.domains)
        sources = (1 if self.corruptions else 0) + len(self.domains)
        self._extra_due = bool(sources) and self._passes.due(trainer, sources)
        done = self._extra_passes(trainer, pl_module, stage) if self._extra_due else None
        full = self._metrics.compute(trainer.strategy, trainer.world_size, pl_module.device)
        names = self._names if self._extra_due or not extra else self._clean_names()
        values = restrict_values(full, names)
        warn_gaps(self, values, names, stage.value, self.domain_key, self._side_names)
        result = pass_result(
            values, stage.value, trained_epoch(trainer), int(trainer.global_step), self.metric_names,
            names, [n for n in self._in_names if n in names],
        )  # fmt: skip
        result["extra_passes"] = "none" if not extra else ("run" if self._extra_due else "skipped")
        if done is not None:
            result["extra_samples"] = extra_samples(done, self._rows, trainer)
            self._passes.measured(result["extra_samples"]["samples"])
            if self.corruptions:  # a cut suite: the clean error of the same samples
                clean = [SUBSET] if result["extra_samples"]["corruptions"]["truncated"] else self._clean_names()
                summary = corruption_summary(full.per_domain, full.sizes, clean, self.corruptions, self.severities,
                                             self._baseline)  # fmt: skip
                result.update(summary)
        if trainer.state.fn == TrainerFn.FITTING:
            self._overhead = self._passes.account()
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
        """Owe the stage's figures to the report (``figures="report"``) or draw them now."""
        if self.figures != "never":
            folder = artifact_dir(trainer, "evaluation")  # on every process (a collective under DDP)
            defer_figures(self._owed, self.figures, trainer, folder, self.results[stage.value], self.metric_names,
                          self._in_names, stage.value, self._figures)  # fmt: skip

    # report and checkpoint --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The latest evaluation (test when run, else the last validation) as plain JSON (see
        :attr:`report_keys`), figures under ``"figures"`` (drawing those owed)."""
        self._owed.draw()
        report = report_of(self.results, self.history, self._figures, self.metric_names, self.domain_key)
        if report["evaluated"]:
            report["overhead"] = dict(self._overhead)
        return report

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "history": self.history, "figures": self._figures,
                **self._passes.state_dict()}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))
        self._figures = dict(state_dict.get("figures", {}))
        self._passes.load_state_dict(state_dict)
