"""``Attribution``: Captum explanations of a fixed sample while the model trains.

Example:
    >>> from lightning_trust.explain import Attribution
    >>> explain = Attribution(method="integrated_gradients", num_samples=32, baseline="zeros")
    >>> explain.report()["top_features"]  # filled by the passes of a fit
    []
    >>> import lightning.pytorch as pl
    >>> from lightning_trust.demo import DigitsDataModule, SmallCNN
    >>> pl.Trainer(max_epochs=5, callbacks=[explain]).fit(SmallCNN(), DigitsDataModule())  # doctest: +SKIP
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, ClassVar, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.budget import DEFAULT_MAX_OVERHEAD, OverheadBudget
from lightning_trust.core.output import DeferredFigures, log_metrics
from lightning_trust.explain import plots
from lightning_trust.explain.account import PassAccount
from lightning_trust.explain.arguments import check_attribution_arguments
from lightning_trust.explain.attribution_report import attribution_report
from lightning_trust.explain.budgeting import CHUNK_SAMPLES, admits_pass, is_final_pass, minimum_samples
from lightning_trust.explain.compute import compute_explanation
from lightning_trust.explain.explanation import Explanation, sample_captions, write_files
from lightning_trust.explain.history import PassHistory
from lightning_trust.explain.keys import ATTRIBUTION_LOGGED_KEYS, ATTRIBUTION_REPORT_KEYS
from lightning_trust.explain.plan import Plan, check_runs_at_validation, make_plan
from lightning_trust.explain.resolution import Modality, resolve_modality
from lightning_trust.explain.sample import FixedSample, draw_fixed_sample, draw_reference, sample_classes
from lightning_trust.explain.schedule import ScheduledPass

__all__ = ["Attribution"]


class Attribution(ScheduledPass):
    r"""Explain a fixed, seeded sample of validation data with Captum while the model trains.

    At each trigger (``run_on``) the callback computes ``method``'s attributions on ``num_samples``
    samples drawn once (seeded, stratified by class) from the validation data through the batch
    contract, in an isolated pass (:func:`~lightning_trust.core.isolated_eval`: DP hooks paused,
    eval mode, forked RNGs, parameters frozen, modes and grads restored). It scores them (Captum's
    ``infidelity`` and ``sensitivity_max``, the convergence delta of IG/DeepLift/SHAP methods),
    tracks **drift** (Spearman rank correlation of the global importance with the previous pass),
    logs ``explain/*`` metrics and writes files to ``<log_dir>/lightning_trust/explain/``:
    ``importance.csv``/``.json``, ``history.json``, ``attributions.pt`` and, per modality, a
    ranked bar chart ``feature_importance.png`` (tabular; names from ``datamodule.feature_names``),
    heatmaps ``heatmaps.png`` + ``heatmaps/sample_XX.png`` (+ TensorBoard images) for images (and
    ``patch_heatmap.png`` for vision transformers), or ``token_heatmap.png`` (coloured text) and
    ``tokens.html`` for token inputs. Under DDP only rank zero computes; the others go on.

    Args:
        method: one of :data:`~lightning_trust.explain.methods.METHODS` (``"integrated_gradients"``,
            ``"saliency"``, ``"input_x_gradient"``, ``"deeplift"``, ``"deeplift_shap"``, ``"gradient_shap"``,
            ``"occlusion"``, ``"feature_ablation"``, ``"shapley_value_sampling"``, ``"layer_gradcam"``,
            ``"layer_integrated_gradients"``).
        num_samples: how many fixed samples to explain.
        target: class to explain: ``"pred"`` (the model's current prediction), ``"true"`` (the label) or
            a class index.
        baseline: ``"zeros"``, ``"mean"`` (of training inputs), ``"blur"`` (Gaussian-blurred image,
            ``blur_sigma``), ``"train"`` (``num_baselines`` training inputs: a distribution for the SHAP
            methods), a number, or a path to a tensor file (``.pt``/``.npy``).
        layer: dotted module path for the ``layer_*`` methods (``"features.3"``, ``"embedding"``).
        method_kwargs: options passed to Captum (``n_steps``, ``internal_batch_size``,
            ``sliding_window_shapes``, ``n_samples``, ``multiply_by_inputs``...).
        every_n_epochs: explain every n-th validation epoch.
        run_on: ``"validation_end"``, ``"fit_end"``, ``"test_end"`` or a list of them (named ``run_on``,
            not ``on``: YAML 1.1 reads a bare ``on:`` key as ``true``).
        seed: seed of the sample, the baselines drawn from training data and Captum's own sampling.
        stratify: balance the sample over classes when the targets are class labels.
        batch_size: samples per Captum call (``None``: all at once); progress advances per call.
        infidelity_samples: perturbations for Captum's ``infidelity`` (0 turns it off).
        infidelity_noise: std of the Gaussian input perturbation of ``infidelity``.
        sensitivity_samples: perturbations for Captum's ``sensitivity_max`` (0 turns it off).
        sensitivity_radius: L-inf radius of ``sensitivity_max``'s perturbations.
        top_k: features shown in the bar chart, logged and reported.
        feature_names: names of the (flattened) input features; default: ``datamodule.feature_names``.
        modality: ``"auto"`` (integer inputs: text, 4-D: image, else tabular) or forced.
        num_heatmaps: images drawn in the heatmap grid.
        blur_sigma: Gaussian std (pixels) of the ``"blur"`` baseline.
        num_baselines: training inputs drawn for ``baseline="train"``.
        figures: when the pictures are drawn: ``"report"`` (default: when :meth:`report` is first read
            after a pass, e.g. by ``TrustReport`` making the card; the last pass's, from the attributions
            kept: matplotlib costs the fit nothing), at ``"every"`` pass, at the final pass (``"end"``,
            inside the fit and its budget), or ``"never"``.
        sensitivity_at: compute ``sensitivity_max`` (``sensitivity_samples`` extra attributions: the
            costly metric) at ``"every"`` pass or only at the ``"end"``.
        progress: show progress (in the Trainer's progress bar style) for multi-step passes.
        batch_keys: how to read batches (see :class:`~lightning_trust.core.batch.BatchContract`).
        name: the report section (default ``"explain"``); give two Attribution callbacks distinct names.
        input: the attributed keyword input of dict batches (default: ``input_ids``, else
            ``pixel_values``, else the first); the other inputs (``attention_mask``, ``token_type_ids``)
            are passed to Captum as ``additional_forward_args``.
        max_overhead: the passes' time as a share of the fit's own time (default 0.05): a due pass
            runs only when it keeps the total within it (:class:`~lightning_trust.core.OverheadBudget`);
            the final pass (fit or test end, a standalone validation) always runs its minimum (the
            attributions, with the configured ``n_steps``, their delta and infidelity, of the first
            chunk of 8 fixed samples, or of the first chunks holding one sample per class: the sample
            takes the classes in turn), then further chunks of 8 while one more fits what is left
            (``samples_explained`` of ``num_samples``: every aggregate is over them) and only the
            ``sensitivity_max`` perturbations that fit after them. ``None``: every due pass runs in full. What was dropped (what, why, the seconds it would have cost)
            is reported under ``budget``; a number it affects is null there, its partial value kept
            in the record (see :mod:`~lightning_trust.explain.account`).
        max_new_tokens: tokens a causal LM generates (greedily) as the target attributed to its prompt.

    Token models: ``integrated_gradients`` (and ``layer_integrated_gradients`` without ``layer``) runs
    over the input embeddings (``get_input_embeddings()`` of the Hugging Face model inside); baselines
    ``"pad"``/``"mask"`` (that token's id, from the datamodule or the model's config; padding stays
    padding), a token id, ``"zeros"`` (id 0) or ``"zero_embedding"``; token scores are the attributions
    summed over the embedding, 0 at padding. A causal LM (token-level scores and ``generate()``) is
    explained with Captum's ``LLMGradientAttribution``/``LLMAttribution``. A vision transformer's
    attributions are also summed per patch (``patch_heatmap``). The layer, baseline, target and the
    model's output are checked before training (one tiny forward on the first validation batch).

    Example:
        >>> cb = Attribution(method="occlusion", method_kwargs={"sliding_window_shapes": [1, 2, 2]}, target="true")
        >>> cb.report_name, cb.runs_at("validation_end"), cb.runs_at("fit_end")  # fit end: the deferred figures
        ('explain', True, True)
    """

    report_section = "explain"
    area = "explain"
    logged_keys: ClassVar[dict[str, str]] = ATTRIBUTION_LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = ATTRIBUTION_REPORT_KEYS

    def __init__(
        self,
        method: str = "integrated_gradients",
        num_samples: int = 32,
        target: Union[str, int] = "pred",
        baseline: Union[str, float] = "zeros",
        layer: Optional[str] = None,
        method_kwargs: Optional[dict[str, Any]] = None,
        every_n_epochs: int = 1,
        run_on: Union[str, list[str]] = "validation_end",
        seed: int = 0,
        stratify: bool = True,
        batch_size: Optional[int] = None,
        infidelity_samples: int = 10,
        infidelity_noise: float = 0.1,
        sensitivity_samples: int = 5,
        sensitivity_radius: float = 0.02,
        top_k: int = 10,
        feature_names: Optional[list[str]] = None,
        modality: Modality = "auto",
        num_heatmaps: int = 16,
        blur_sigma: float = 1.0,
        num_baselines: int = 16,
        figures: Literal["report", "every", "end", "never"] = "report",
        sensitivity_at: Literal["every", "end"] = "end",
        progress: bool = True,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
        input: Optional[str] = None,
        max_overhead: Optional[float] = DEFAULT_MAX_OVERHEAD,
        max_new_tokens: int = 4,
    ) -> None:
        super().__init__(run_on, every_n_epochs, name=name)
        check_attribution_arguments(
            method=method, num_samples=num_samples, target=target, baseline=baseline, layer=layer,
            method_kwargs=method_kwargs, batch_size=batch_size, infidelity_samples=infidelity_samples,
            infidelity_noise=infidelity_noise, sensitivity_samples=sensitivity_samples,
            sensitivity_radius=sensitivity_radius, top_k=top_k, modality=modality, num_heatmaps=num_heatmaps,
            blur_sigma=blur_sigma, num_baselines=num_baselines, figures=figures, sensitivity_at=sensitivity_at,
            input=input, max_overhead=max_overhead, max_new_tokens=max_new_tokens,
        )  # fmt: skip
        self.method = method
        self.num_samples = num_samples
        self.target = target
        self.baseline = baseline
        self.layer = layer
        self.method_kwargs = dict(method_kwargs or {})
        self.seed = seed
        self.stratify = stratify
        self.batch_size = batch_size
        self.infidelity_samples = infidelity_samples
        self.infidelity_noise = infidelity_noise
        self.sensitivity_samples = sensitivity_samples
        self.sensitivity_radius = sensitivity_radius
        self.top_k = top_k
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.modality = modality
        self.num_heatmaps = num_heatmaps
        self.blur_sigma = blur_sigma
        self.num_baselines = num_baselines
        self.figures = figures
        self.sensitivity_at = sensitivity_at
        self.progress = progress
        self.batch_keys = batch_keys
        self.input = input
        self.max_new_tokens = max_new_tokens
        self.budget = OverheadBudget(max_overhead)
        self.account = PassAccount(self.budget)  # passes run, work dropped, the final pass's allowance
        # state
        self._plan: Optional[Plan] = None
        self.sample: Optional[FixedSample] = None
        self.reference: Optional[Tensor] = None  # training inputs for "mean"/"train" baselines
        self.track = PassHistory()  # each pass's record, and the drift's reference
        self.last: Optional[Explanation] = None
        self._figures: dict[str, str] = {}
        self._owed = DeferredFigures()  # figures="report": drawn when the report is read
        self.total_seconds = 0.0  # time spent in this callback's passes (explaining, files, figures)

    # setup: the checks before training --------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.budget.start()
        if trainer.is_global_zero and (self.runs_at("validation_end") or self.runs_at("fit_end")):
            check_runs_at_validation(self, trainer, pl_module)
            self._plan = make_plan(self, pl_module, trainer)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            self._plan is None
            and trainer.is_global_zero
            and not trainer.sanity_checking
            and self.runs_at("validation_end")
        ):
            self._plan = make_plan(self, pl_module, trainer)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.runs_at("test_end"):
            self._plan = make_plan(self, pl_module, trainer)

    # schedule ---------------------------------------------------------------------------------
    def runs_at(self, stage: str) -> bool:
        """Also at the end of fit when passes at validation defer work (figures or sensitivity) to the
        end: that final pass does it, even when ``every_n_epochs`` skipped every epoch, and replaces
        a pass made on the same weights."""
        deferred = self.figures == "end" or (self.sensitivity_at == "end" and self.sensitivity_samples > 0)
        return super().runs_at(stage) or (stage == "fit_end" and deferred and "validation_end" in self.stages)

    # the pass ---------------------------------------------------------------------------------
    @property
    def skipped(self) -> list[dict[str, Any]]:
        """The work the budget dropped: whole passes and ``sensitivity_max`` perturbations."""
        return self.account.skipped

    @property
    def history(self) -> list[dict[str, Any]]:
        """Each pass's record (stage, epoch, step, drift, quality, top features, seconds, samples)."""
        return self.track.entries

    @property
    def pass_seconds(self) -> list[float]:
        """Each pass's time in this fit."""
        return self.account.pass_seconds

    def _run(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        if not admits_pass(self, trainer, self._is_final(trainer, stage)):
            estimate = getattr(self._plan, "pass_estimate", None)
            expected = self.budget.expected_cost() if self.budget.runs else estimate
            self.account.skip_pass(stage, int(trainer.current_epoch), int(trainer.global_step), expected)
            return
        before = self.budget.spent
        in_fit = getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.FITTING
        self.account.begin(final=self._is_final(trainer, stage), in_fit=in_fit)
        with self.budget.timed():
            self._pass(trainer, pl_module, stage, hook_allows_log)
        self.account.end(self, stage, self.budget.spent - before, self.num_samples)

    def _is_final(self, trainer: Any, stage: str) -> bool:
        return is_final_pass(trainer, stage, self.runs_at("fit_end"))

    def sensitivity_count(self, unit_seconds: float, configured: int) -> int:
        """Policy: how many of the ``configured`` ``sensitivity_max`` perturbations a pass runs, one
        attribution of the sample costing ``unit_seconds``: those that fit the budget in fit (see
        :func:`~lightning_trust.explain.budgeting.sensitivity_perturbations`), all otherwise. Override
        for another rule; fewer than ``configured`` is reported under ``budget``."""
        return self.account.sensitivity_count(unit_seconds, configured)

    def explain_more(self, done: int, seconds: float) -> bool:
        """Policy: whether a pass explains the chunk of samples after its first ``done`` (``seconds``: the
        chunks' time so far): within its minimum always, then while one more chunk fits the budget (see
        :meth:`~lightning_trust.explain.account.PassAccount.explain_more`); a pass that is not sized (not
        final, outside fit, ``max_overhead=None``) explains every sample. Override for another rule."""
        return self.account.explain_more(done)

    def _pass(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        start = time.perf_counter()
        final = stage != "validation_end"
        replace = (
            final
            and self.last is not None
            and self.last.step == trainer.global_step
            and self.last.stage == "validation_end"
        )
        result = self.explain(pl_module, trainer, stage=stage, final=final, replace_last=replace)
        metrics = {
            "explain/drift": result.drift,
            "explain/convergence_delta": result.convergence_delta,
            "explain/infidelity": result.infidelity,
            "explain/sensitivity_max": result.sensitivity_max,
        }
        for item in result.top(self.top_k):
            metrics[f"explain/importance/{item['feature']}"] = item["score"]
        log_metrics(trainer, pl_module, metrics, hook_allows_log)
        self._write(trainer, result)
        if self.figures == "every" or (self.figures == "end" and final):
            self._draw(trainer, result)
        elif self.figures == "report":  # the last pass's figures, drawn once when the report is read
            self._owed.defer("explanation", partial(self._draw, trainer, result))
        self.total_seconds += time.perf_counter() - start

    def explain(
        self, pl_module: Any, trainer: Any = None, stage: str = "manual", final: bool = True, replace_last: bool = False
    ) -> Explanation:
        """Run one explanation pass now (the hooks call this) and return it; updates drift and history.

        ``final``: include the work deferred to the end (``sensitivity_at="end"``). ``replace_last``: this
        pass redoes the last one on the same weights (with the deferred work): it takes its place in the
        history and its drift is against the pass before.
        """
        if replace_last:
            self.track.undo_last()
        if self._plan is None:
            self._plan = make_plan(self, pl_module, trainer)
        contract = BatchContract.resolve(self.batch_keys, trainer)
        if self.sample is None:
            self.sample = draw_fixed_sample(trainer, contract, self.num_samples, self.seed, self.stratify, self.input)
        if self.baseline in ("mean", "train") and self.reference is None:
            size = 2048 if self.baseline == "mean" else self.num_baselines
            self.reference = draw_reference(trainer, contract, size, self.seed + 1, self.input, str(self.baseline))
        # validate/test hooks run under torch.inference_mode, which enable_grad alone does not lift
        with torch.inference_mode(False):
            return self._explain(pl_module, trainer, stage, final)

    def _explain(self, pl_module: Any, trainer: Any, stage: str, final: bool) -> Explanation:
        assert self.sample is not None and self._plan is not None  # drawn and planned by `explain`
        chunk = None
        if self.account.sizes_samples():  # a final pass in fit: in chunks, as many as the budget affords
            chunk = min(self.batch_size or CHUNK_SAMPLES, CHUNK_SAMPLES)  # Captum calls within a budget chunk
            total = len(self.sample.inputs)
            self.account.plan_samples(total, minimum_samples(sample_classes(self.sample), total), CHUNK_SAMPLES)
        result = compute_explanation(
            self, pl_module, trainer, self._plan, self.sample, stage, final, self.sensitivity_count,
            self.explain_more if chunk else None, chunk,
        )  # fmt: skip
        self.account.record_samples(result)
        self.account.record_sensitivity(result)
        self.track.record(result, self.top_k)
        self.last = result
        return result

    # outputs ----------------------------------------------------------------------------------
    def _write(self, trainer: Any, result: Explanation) -> None:
        indices = self.sample.indices[: result.samples_explained] if self.sample else []
        result.files = write_files(self.folder(trainer), result, self.method, self.history, indices)

    def _draw(self, trainer: Any, result: Explanation) -> None:
        m = min(self.num_heatmaps, len(result.inputs))
        drawn = plots.draw_explanation(
            trainer, self.folder(trainer), result, resolve_modality(self.modality, result.inputs), f"{self.method}, epoch {result.epoch}",
            self.top_k, self.num_heatmaps, sample_captions(self.sample, result, m),
        )  # fmt: skip
        self._figures.update(drawn)

    # report and checkpoint ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The last pass as plain JSON (see :attr:`report_keys`), figures under ``"figures"`` (drawn now,
        once, when ``figures="report"``)."""
        self._owed.draw()
        return attribution_report(self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sample": None if self.sample is None else self.sample.state(),
            "reference": self.reference,
            **self.track.state_dict(),
            "budget": self.budget.state_dict(),
            "skipped": self.skipped,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sample = state_dict.get("sample")
        self.sample = None if sample is None else FixedSample.from_state(sample)
        self.reference = state_dict.get("reference")
        self.track.load_state_dict(state_dict)
        self.budget.load_state_dict(state_dict.get("budget", {}))
        self.account.skipped[:] = list(state_dict.get("skipped", []))
