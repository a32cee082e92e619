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
from typing import Any, ClassVar, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, call_module, logits_of
from lightning_trust.core.loaders import find_loader
from lightning_trust.core.output import log_metrics
from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.tensors import to_jsonable
from lightning_trust.explain import plots
from lightning_trust.explain.explanation import (
    Explanation,
    feature_names,
    rank_correlation,
    to_input_space,
    write_files,
)
from lightning_trust.explain.methods import BASELINES, METHODS, attribute, chunk_slices, make_baselines, split_options
from lightning_trust.explain.progress import progress
from lightning_trust.explain.sample import FixedSample, draw_sample
from lightning_trust.explain.schedule import ScheduledPass

__all__ = ["Attribution"]

Modality = Literal["auto", "tabular", "image", "text"]


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
    heatmaps ``heatmaps.png`` + ``heatmaps/sample_XX.png`` (+ TensorBoard images) for images, or
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
        figures: draw pictures at ``"every"`` pass, only at the ``"end"`` (fit/test end), or ``"never"``.
        sensitivity_at: compute ``sensitivity_max`` (``sensitivity_samples`` extra attributions: the
            costly metric) at ``"every"`` pass or only at the ``"end"``.
        progress: show progress (in the Trainer's progress bar style) for multi-step passes.
        batch_keys: how to read batches (see :class:`~lightning_trust.core.batch.BatchContract`).
        name: the report section (default ``"explain"``); give two Attribution callbacks distinct names.

    Example:
        >>> cb = Attribution(method="occlusion", method_kwargs={"sliding_window_shapes": [1, 2, 2]}, target="true")
        >>> cb.report_name, cb.runs_at("validation_end"), cb.runs_at("fit_end")  # fit end: the deferred figures
        ('explain', True, True)
    """

    report_section = "explain"
    area = "explain"
    logged_keys: ClassVar[dict[str, str]] = {
        "explain/drift": "Spearman rank correlation of the global importance with the previous pass's",
        "explain/convergence_delta": "mean |convergence delta| of the attributions (IG, DeepLift, SHAP methods)",
        "explain/infidelity": "Captum's infidelity of the attributions (lower: more faithful)",
        "explain/sensitivity_max": "Captum's sensitivity_max of the attributions (lower: more stable)",
        "explain/importance/<feature>": "mean |attribution| of one of the top_k features",
    }
    report_keys: ClassVar[dict[str, str]] = {
        "method": "the Captum method",
        "target": "the class explained: 'pred', 'true' or a class index",
        "baseline": "the baseline: a named one, a number, or 'file'",
        "num_samples": "size of the fixed sample explained",
        "epoch": "epoch of the last pass (null before any)",
        "top_features": "the top_k features of the last pass, [{feature, score}]",
        "infidelity": "Captum's infidelity of the last pass",
        "sensitivity_max": "Captum's sensitivity_max of the last pass (null when not computed)",
        "convergence_delta": "mean |convergence delta| of the last pass (null for methods without one)",
        "drift": "rank correlation of the last pass's importance with the pass before",
        "drift_history": "drift of every pass, in order",
        "seconds": "time spent in this callback's passes (explaining, files, figures)",
        "files": "paths of importance.csv/.json, history.json and attributions.pt",
    }

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
        figures: Literal["every", "end", "never"] = "end",
        sensitivity_at: Literal["every", "end"] = "end",
        progress: bool = True,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(run_on, every_n_epochs, name=name)
        if method not in METHODS:
            raise ValueError(f"Unknown `method={method!r}`; choose one of {sorted(METHODS)}.")
        spec = METHODS[method]
        if spec.layer and not layer:
            raise ValueError(
                f"method {method!r} attributes to a layer: set `layer` to its dotted module path (e.g. 'features.3')."
            )
        if layer and not spec.layer:
            raise ValueError(
                f"`layer` is only used by the layer_* methods, not by {method!r}; remove it or pick a layer_* method."
            )
        split_options(method, method_kwargs)  # fails early on unknown options
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples}.")
        if not (
            target in ("pred", "true") or (isinstance(target, int) and not isinstance(target, bool) and target >= 0)
        ):
            raise ValueError(f"`target` must be 'pred', 'true' or a class index >= 0, got {target!r}.")
        if isinstance(baseline, bool) or not isinstance(baseline, (str, int, float)):
            raise ValueError(
                f"`baseline` must be one of {list(BASELINES)}, a number or a tensor file path, got {baseline!r}."
            )
        if isinstance(baseline, str) and baseline not in BASELINES and not baseline.endswith((".pt", ".pth", ".npy")):
            raise ValueError(
                f"`baseline={baseline!r}` is not one of {list(BASELINES)} nor a tensor file (.pt, .pth, .npy)."
            )
        if spec.baseline is None and baseline != "zeros":
            raise ValueError(f"method {method!r} takes no baseline; leave `baseline` at 'zeros' (it is ignored).")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size}.")
        for arg, count in (("infidelity_samples", infidelity_samples), ("sensitivity_samples", sensitivity_samples)):
            if count < 0:
                raise ValueError(f"`{arg}` must be >= 0 (0 turns the metric off), got {count}.")
        for arg, scale in (
            ("infidelity_noise", infidelity_noise),
            ("sensitivity_radius", sensitivity_radius),
            ("blur_sigma", blur_sigma),
        ):
            if scale <= 0:
                raise ValueError(f"`{arg}` must be positive, got {scale}.")
        if top_k < 1 or num_heatmaps < 1 or num_baselines < 1:
            raise ValueError("`top_k`, `num_heatmaps` and `num_baselines` must be positive integers.")
        if modality not in ("auto", "tabular", "image", "text"):
            raise ValueError(f"`modality` must be 'auto', 'tabular', 'image' or 'text', got {modality!r}.")
        if figures not in ("every", "end", "never"):
            raise ValueError(f"`figures` must be 'every', 'end' or 'never', got {figures!r}.")
        if sensitivity_at not in ("every", "end"):
            raise ValueError(f"`sensitivity_at` must be 'every' or 'end', got {sensitivity_at!r}.")
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
        # state
        self.sample: Optional[FixedSample] = None
        self.reference: Optional[Tensor] = None  # training inputs for "mean"/"train" baselines
        self.previous: Optional[Tensor] = None  # the last pass's global importance
        self._previous_before: Optional[Tensor] = None
        self.history: list[dict[str, Any]] = []
        self.last: Optional[Explanation] = None
        self._figures: dict[str, str] = {}
        self.total_seconds = 0.0  # time spent in this callback's passes (explaining, files, figures)

    # schedule ---------------------------------------------------------------------------------
    def runs_at(self, stage: str) -> bool:
        """Also at the end of fit when passes at validation defer work (figures or sensitivity) to the
        end: that final pass does it, even when ``every_n_epochs`` skipped every epoch, and replaces
        a pass made on the same weights."""
        deferred = self.figures == "end" or (self.sensitivity_at == "end" and self.sensitivity_samples > 0)
        return super().runs_at(stage) or (stage == "fit_end" and deferred and "validation_end" in self.stages)

    # the pass ---------------------------------------------------------------------------------
    def _run(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
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
        self.total_seconds += time.perf_counter() - start

    def explain(
        self, pl_module: Any, trainer: Any = None, stage: str = "manual", final: bool = True, replace_last: bool = False
    ) -> Explanation:
        """Run one explanation pass now (the hooks call this) and return it; updates drift and history.

        ``final``: include the work deferred to the end (``sensitivity_at="end"``). ``replace_last``: this
        pass redoes the last one on the same weights (with the deferred work): it takes its place in the
        history and its drift is against the pass before.
        """
        if replace_last and self.history:
            self.history.pop()
            self.previous = self._previous_before
        contract = BatchContract.resolve(self.batch_keys, trainer)
        if self.sample is None:
            loader, kind = find_loader(trainer, ("val", "test"))
            if loader is None:
                raise RuntimeError(
                    "Attribution found no validation (or test) DataLoader to draw its samples from; give the "
                    "Trainer validation data or a datamodule with `val_dataloader`."
                )
            self.sample = draw_sample(loader, contract, self.num_samples, self.seed, self.stratify, source=kind)
        if self.baseline in ("mean", "train") and self.reference is None:
            loader, kind = find_loader(trainer, ("train",))
            if loader is None:
                raise RuntimeError(f"baseline={self.baseline!r} needs training data; none is attached to the Trainer.")
            size = 2048 if self.baseline == "mean" else self.num_baselines
            self.reference = draw_sample(loader, contract, size, self.seed + 1, stratify=False, source=kind).inputs
        start = time.perf_counter()
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        # validate/test hooks run under torch.inference_mode, which enable_grad alone does not lift
        with torch.inference_mode(False):
            return self._explain(pl_module, trainer, stage, final, start, device)

    def _explain(self, pl_module: Any, trainer: Any, stage: str, final: bool, start: float, device: Any) -> Explanation:
        assert self.sample is not None  # drawn by `explain`
        inputs = self.sample.inputs.to(device).clone()  # a normal tensor even if drawn under inference mode
        modality = self._modality(inputs)
        with isolated_eval(pl_module, trainer, grad=True) as module:  # forks every RNG Captum draws from
            for p in module.parameters():
                p.requires_grad_(False)  # gradients w.r.t. inputs only: no trace in parameter grads or hooks
            torch.manual_seed(self.seed)
            np.random.seed(self.seed % 2**32)
            targets = self._targets(module, inputs)
            baselines = self._baselines(inputs)
            spec = METHODS[self.method]
            quality = modality != "text" and not spec.layer  # Captum's metrics perturb float inputs
            with_sensitivity = quality and self.sensitivity_samples > 0 and (final or self.sensitivity_at == "every")
            chunks = chunk_slices(len(inputs), self.batch_size)
            steps = len(chunks) * (1 + (quality and self.infidelity_samples > 0) + with_sensitivity)
            with progress(trainer, steps, f"Attribution ({self.method})", self.progress) as bar:
                attributions, delta, infid, sens = attribute(
                    self.method, module, inputs, chunks, bar.advance, layer=self.layer, options=self.method_kwargs,
                    baselines=baselines, targets=targets, infidelity_samples=self.infidelity_samples if quality else 0,
                    infidelity_noise=self.infidelity_noise, sensitivity_samples=self.sensitivity_samples if with_sensitivity else 0,
                    sensitivity_radius=self.sensitivity_radius,
                )  # fmt: skip
        input_attr = to_input_space(attributions, inputs, modality, self.method)
        importance = input_attr.detach().abs().float().mean(dim=0).flatten().cpu()
        datamodule_names = getattr(getattr(trainer, "datamodule", None), "feature_names", None)
        names = feature_names(input_attr, modality, self.feature_names, datamodule_names)
        drift = rank_correlation(importance, self.previous) if self.previous is not None else None
        result = Explanation(
            stage=stage,
            epoch=int(getattr(trainer, "current_epoch", 0) or 0),
            step=int(getattr(trainer, "global_step", 0) or 0),
            inputs=inputs.detach().cpu(),
            targets=None if targets is None else targets.detach().cpu(),
            baselines=None if baselines is None else baselines.detach().cpu(),
            attributions=attributions.detach().cpu(),
            input_attributions=input_attr.detach().cpu(),
            importance=importance,
            names=names,
            delta=None if delta is None else delta.detach().cpu(),
            infidelity=infid,
            sensitivity_max=sens,
            drift=drift,
            seconds=time.perf_counter() - start,
        )
        self._previous_before = self.previous
        self.previous = importance
        self.last = result
        self.history.append({
            "stage": stage, "epoch": result.epoch, "step": result.step, "drift": drift,
            "convergence_delta": result.convergence_delta, "infidelity": infid, "sensitivity_max": sens,
            "top_features": result.top(self.top_k), "seconds": result.seconds,
        })  # fmt: skip
        return result

    def _modality(self, inputs: Tensor) -> str:
        if self.modality != "auto":
            return self.modality
        if not inputs.is_floating_point():
            return "text"
        return "image" if inputs.ndim == 4 else "tabular"

    def _targets(self, module: Any, inputs: Tensor) -> Optional[Tensor]:
        if isinstance(self.target, int):
            return torch.full((len(inputs),), self.target, dtype=torch.long, device=inputs.device)
        if self.target == "true":
            if self.sample is None or self.sample.targets is None:
                raise ValueError("`target='true'` needs targets in the batches; use 'pred' or a class index.")
            return self.sample.targets.to(inputs.device).long()
        with torch.no_grad():
            scores = logits_of(call_module(module, inputs))
        if scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):
            return None  # a single score per sample: attribute that score
        return scores.argmax(dim=1)

    def _baselines(self, inputs: Tensor) -> Optional[Tensor]:
        spec = METHODS[self.method]
        if spec.baseline is None:
            return None
        reference = None if self.reference is None else self.reference.to(inputs.device).clone()
        return make_baselines(self.baseline, inputs, reference, self.blur_sigma, spec.baseline == "distribution")

    # outputs ----------------------------------------------------------------------------------
    def _write(self, trainer: Any, result: Explanation) -> None:
        indices = self.sample.indices if self.sample else []
        result.files = write_files(self.folder(trainer), result, self.method, self.history, indices)

    def _draw(self, trainer: Any, result: Explanation) -> None:
        m = min(self.num_heatmaps, len(result.inputs))
        drawn = plots.draw_explanation(
            trainer, self.folder(trainer), result, self._modality(result.inputs), f"{self.method}, epoch {result.epoch}",
            self.top_k, self.num_heatmaps, self._captions(result, m),
        )  # fmt: skip
        self._figures.update(drawn)

    def _captions(self, result: Explanation, m: int) -> list[str]:
        captions = []
        for i in range(m):
            parts = [f"#{self.sample.indices[i] if self.sample else i}"]
            if self.sample is not None and self.sample.targets is not None:
                parts.append(f"y={int(self.sample.targets[i])}")
            if result.targets is not None:
                parts.append(f"t={int(result.targets[i])}")
            captions.append(" ".join(parts))
        return captions

    # report and checkpoint ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The last pass as plain JSON (see :attr:`report_keys`), figures under ``"figures"``."""
        last = self.last
        return to_jsonable({
            "method": self.method,
            "target": self.target,
            "baseline": self.baseline if not isinstance(self.baseline, str) or self.baseline in BASELINES else "file",
            "num_samples": len(self.sample.inputs) if self.sample is not None else self.num_samples,
            "epoch": None if last is None else last.epoch,
            "top_features": [] if last is None else last.top(self.top_k),
            "infidelity": None if last is None else last.infidelity,
            "sensitivity_max": None if last is None else last.sensitivity_max,
            "convergence_delta": None if last is None else last.convergence_delta,
            "drift": None if last is None else last.drift,
            "drift_history": [h["drift"] for h in self.history],
            "seconds": self.total_seconds,
            "figures": dict(self._figures),
            "files": {} if last is None else dict(last.files),
        })  # fmt: skip

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sample": None if self.sample is None else self.sample.state(),
            "reference": self.reference,
            "previous": self.previous,
            "previous_before": self._previous_before,
            "history": self.history,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sample = state_dict.get("sample")
        self.sample = None if sample is None else FixedSample.from_state(sample)
        self.reference = state_dict.get("reference")
        self.previous = state_dict.get("previous")
        self._previous_before = state_dict.get("previous_before")
        self.history = list(state_dict.get("history", []))
