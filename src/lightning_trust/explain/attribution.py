"""``Attribution``: Captum explanations of a fixed sample while the model trains.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_trust.demo import DigitsDataModule, SmallCNN
    >>> from lightning_trust.explain import Attribution
    >>> explain = Attribution(method="integrated_gradients", num_samples=32, baseline="zeros")
    >>> pl.Trainer(max_epochs=5, callbacks=[explain]).fit(SmallCNN(), DigitsDataModule())
    >>> explain.report()["top_features"][:3]
"""

from __future__ import annotations

import csv
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lightning_trust.core.batch import BatchContract
from lightning_trust.explain import plots
from lightning_trust.explain._common import (
    FixedSample,
    ScheduledPass,
    draw_sample,
    find_loader,
    log_metrics,
    progress,
)
from lightning_trust.explain.methods import BASELINES, METHODS, build_explainer, make_baselines, split_options
from lightning_trust.core import isolated_eval, save_figure, to_jsonable, write_json

Modality = Literal["auto", "tabular", "image", "text"]


@dataclass
class Explanation:
    """One explanation pass: the sample, what Captum returned, and the scores derived from it."""

    stage: str
    epoch: int
    step: int
    inputs: Tensor
    targets: Optional[Tensor]
    baselines: Optional[Tensor]
    attributions: Tensor  # what Captum returned
    input_attributions: Tensor  # in input space: (N, *input) for images/tabular, (N, T) for tokens
    importance: Tensor  # mean |attribution| per feature (flattened)
    names: list[str]
    delta: Optional[Tensor] = None  # per-sample convergence delta
    infidelity: Optional[float] = None
    sensitivity_max: Optional[float] = None
    drift: Optional[float] = None
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def convergence_delta(self) -> Optional[float]:
        return None if self.delta is None else float(self.delta.abs().mean())

    def top(self, k: int) -> list[dict[str, Any]]:
        order = torch.argsort(self.importance, descending=True, stable=True)[:k]
        return [{"feature": self.names[i], "score": float(self.importance[i])} for i in order.tolist()]


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two importance vectors: Pearson's correlation of their average
    ranks (``scipy.stats.rankdata``), as ``scipy.stats.spearmanr`` computes it without its per-call
    overhead; NaN when one is constant."""
    from scipy.stats import rankdata

    if a.numel() < 2 or a.shape != b.shape:
        return float("nan")
    ra, rb = rankdata(a.double().numpy()), rankdata(b.double().numpy())
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@contextmanager
def _fork_host_rngs() -> Iterator[None]:
    # Captum draws some samples with numpy/python RNGs; isolated_eval forks torch's only.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


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

    Example:
        >>> Attribution(method="occlusion", method_kwargs={"sliding_window_shapes": [1, 2, 2]}, target="true")
    """

    report_section = "explain"
    area = "explain"

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
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"Unknown `method={method!r}`; choose one of {sorted(METHODS)}.")
        spec = METHODS[method]
        if spec.layer and not layer:
            raise ValueError(f"method {method!r} attributes to a layer: set `layer` to its dotted module path (e.g. 'features.3').")
        if layer and not spec.layer:
            raise ValueError(f"`layer` is only used by the layer_* methods, not by {method!r}; remove it or pick a layer_* method.")
        split_options(method, method_kwargs)  # fails early on unknown options
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples}.")
        if not (target in ("pred", "true") or (isinstance(target, int) and not isinstance(target, bool) and target >= 0)):
            raise ValueError(f"`target` must be 'pred', 'true' or a class index >= 0, got {target!r}.")
        if isinstance(baseline, bool) or not isinstance(baseline, (str, int, float)):
            raise ValueError(f"`baseline` must be one of {list(BASELINES)}, a number or a tensor file path, got {baseline!r}.")
        if isinstance(baseline, str) and baseline not in BASELINES and not baseline.endswith((".pt", ".pth", ".npy")):
            raise ValueError(
                f"`baseline={baseline!r}` is not one of {list(BASELINES)} nor a tensor file (.pt, .pth, .npy)."
            )
        if spec.baseline is None and baseline != "zeros":
            raise ValueError(f"method {method!r} takes no baseline; leave `baseline` at 'zeros' (it is ignored).")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size}.")
        for name, value in (("infidelity_samples", infidelity_samples), ("sensitivity_samples", sensitivity_samples)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0 (0 turns the metric off), got {value}.")
        for name, value in (("infidelity_noise", infidelity_noise), ("sensitivity_radius", sensitivity_radius), ("blur_sigma", blur_sigma)):
            if value <= 0:
                raise ValueError(f"`{name}` must be positive, got {value}.")
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
        self._init_schedule(run_on, every_n_epochs)
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

    # hooks ------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        deferred = self.figures == "end" or (self.sensitivity_at == "end" and self.sensitivity_samples > 0)
        if "fit_end" in self.stages or (deferred and "validation_end" in self.stages):
            # the final pass, with the deferred work (even when every_n_epochs skipped every epoch);
            # it replaces a pass made on the same weights
            self._trigger(trainer, pl_module, "fit_end", hook_allows_log=False)

    # the pass ---------------------------------------------------------------------------------
    def _run(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        start = time.perf_counter()
        final = stage != "validation_end"
        replace = final and self.last is not None and self.last.step == trainer.global_step and self.last.stage == "validation_end"
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
        inputs = self.sample.inputs.to(device).clone()  # a normal tensor even if drawn under inference mode
        modality = self._modality(inputs)
        with isolated_eval(pl_module, trainer, grad=True) as module, _fork_host_rngs():
            for p in module.parameters():
                p.requires_grad_(False)  # gradients w.r.t. inputs only: no trace in parameter grads or hooks
            torch.manual_seed(self.seed)
            np.random.seed(self.seed % 2**32)
            targets = self._targets(module, inputs)
            baselines = self._baselines(inputs)
            with_sensitivity = self.sensitivity_samples > 0 and (final or self.sensitivity_at == "every")
            attributions, delta, infid, sens = self._attribute(
                trainer, module, inputs, baselines, targets, modality, with_sensitivity
            )
        input_attr = self._to_input_space(attributions, inputs, modality)
        importance = input_attr.detach().abs().float().mean(dim=0).flatten().cpu()
        names = self._names(trainer, inputs, input_attr, modality)
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
            scores = module(inputs)
        if not isinstance(scores, Tensor):
            raise TypeError(f"Attribution needs the module's forward to return a tensor of scores, got {type(scores).__name__}.")
        if scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):
            return None  # a single score per sample: attribute that score
        return scores.argmax(dim=1)

    def _baselines(self, inputs: Tensor) -> Optional[Tensor]:
        spec = METHODS[self.method]
        if spec.baseline is None:
            return None
        reference = None if self.reference is None else self.reference.to(inputs.device).clone()
        return make_baselines(self.baseline, inputs, reference, self.blur_sigma, spec.baseline == "distribution")

    def _attribute(
        self,
        trainer: Any,
        module: Any,
        inputs: Tensor,
        baselines: Optional[Tensor],
        targets: Optional[Tensor],
        modality: str,
        with_sensitivity: bool,
    ) -> tuple[Tensor, Optional[Tensor], Optional[float], Optional[float]]:
        from captum.metrics import infidelity, sensitivity_max

        spec = METHODS[self.method]
        explainer = build_explainer(self.method, module, self.layer, self.method_kwargs)
        _, call = split_options(self.method, self.method_kwargs)
        n = len(inputs)
        size = self.batch_size or n
        chunks = [slice(i, min(i + size, n)) for i in range(0, n, size)]
        per_sample_base = baselines is not None and spec.baseline == "single"
        quality = modality != "text" and not spec.layer
        with_sensitivity = with_sensitivity and quality
        steps = len(chunks) * (1 + (quality and self.infidelity_samples > 0) + with_sensitivity)
        attrs, deltas, infids, sens = [], [], [], []
        with progress(trainer, steps, f"Attribution ({self.method})", self.progress) as bar:
            for part in chunks:
                kwargs: dict[str, Any] = dict(call)
                if baselines is not None:
                    kwargs["baselines"] = baselines[part] if per_sample_base else baselines
                if targets is not None:
                    kwargs["target"] = targets[part]
                if spec.delta:
                    attr, delta = explainer.attribute(inputs[part], return_convergence_delta=True, **kwargs)
                    deltas.append(delta.reshape(-1))
                else:
                    attr = explainer.attribute(inputs[part], **kwargs)
                attrs.append(attr.detach())
                bar.advance()
                if quality and self.infidelity_samples > 0:
                    noise = self.infidelity_noise

                    def perturb(x: Tensor) -> tuple[Tensor, Tensor]:
                        delta_x = torch.randn_like(x) * noise
                        return delta_x, x - delta_x

                    value = infidelity(
                        module, perturb, inputs[part], attr.detach(), target=kwargs.get("target"),
                        n_perturb_samples=self.infidelity_samples, normalize=True,
                    )  # fmt: skip
                    infids.append(value.detach().reshape(-1))
                    bar.advance()
                if with_sensitivity:
                    fixed_base = kwargs.pop("baselines", None) if spec.baseline == "distribution" else None

                    def explanation(x: Tensor, **kw: Any) -> Tensor:
                        if fixed_base is not None:
                            kw["baselines"] = fixed_base  # a distribution: not expanded per perturbation
                        return explainer.attribute(x, **kw)

                    value = sensitivity_max(
                        explanation, inputs[part], perturb_radius=self.sensitivity_radius,
                        n_perturb_samples=self.sensitivity_samples, **kwargs,
                    )  # fmt: skip
                    sens.append(value.detach().reshape(-1))
                    bar.advance()
        attributions = torch.cat(attrs)
        delta = torch.cat(deltas) if deltas else None
        mean_infid = float(torch.cat(infids).float().mean()) if infids else None
        mean_sens = float(torch.cat(sens).float().mean()) if sens else None
        return attributions, delta, mean_infid, mean_sens

    def _to_input_space(self, attributions: Tensor, inputs: Tensor, modality: str) -> Tensor:
        if modality == "text" and attributions.ndim > 2:
            return attributions.sum(dim=tuple(range(2, attributions.ndim)))  # per token
        if self.method == "layer_gradcam" and modality == "image" and attributions.shape[-2:] != inputs.shape[-2:]:
            from captum.attr import LayerAttribution

            return LayerAttribution.interpolate(attributions, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
        return attributions

    def _names(self, trainer: Any, inputs: Tensor, input_attr: Tensor, modality: str) -> list[str]:
        count = int(input_attr[0].numel())
        for candidate in (self.feature_names, getattr(getattr(trainer, "datamodule", None), "feature_names", None)):
            if candidate is not None and len(candidate) == count:
                return [str(c) for c in candidate]
        if self.feature_names is not None:
            raise ValueError(f"`feature_names` has {len(self.feature_names)} names but the attributions have {count} features.")
        shape = tuple(input_attr.shape[1:])
        if modality == "text":
            return [f"token[{t}]" for t in range(count)]
        if modality == "image" and len(shape) == 3:
            c, h, w = shape
            if c == 1:
                return [f"pixel({r},{k})" for r in range(h) for k in range(w)]
            return [f"c{ch}({r},{k})" for ch in range(c) for r in range(h) for k in range(w)]
        if len(shape) == 1:
            return [f"x[{i}]" for i in range(count)]
        return [f"x{list(np.unravel_index(i, shape))}" for i in range(count)]

    # outputs ----------------------------------------------------------------------------------
    def _write(self, trainer: Any, result: Explanation) -> None:
        folder = self.folder(trainer)
        order = torch.argsort(result.importance, descending=True, stable=True).tolist()
        with open(folder / "importance.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["rank", "feature", "score"])
            for rank, i in enumerate(order, start=1):
                writer.writerow([rank, result.names[i], f"{float(result.importance[i]):.8g}"])
        write_json(folder / "importance.json", {
            "method": self.method, "stage": result.stage, "epoch": result.epoch, "step": result.step,
            "importance": [{"feature": result.names[i], "score": float(result.importance[i])} for i in order],
        })  # fmt: skip
        write_json(folder / "history.json", self.history)
        torch.save({
            "indices": self.sample.indices if self.sample else [], "inputs": result.inputs, "targets": result.targets,
            "baselines": result.baselines, "attributions": result.attributions, "delta": result.delta,
            "names": result.names, "epoch": result.epoch,
        }, folder / "attributions.pt")  # fmt: skip
        result.files = {k: str(folder / v) for k, v in (
            ("importance_csv", "importance.csv"), ("importance_json", "importance.json"),
            ("history", "history.json"), ("attributions", "attributions.pt"),
        )}  # fmt: skip

    def _draw(self, trainer: Any, result: Explanation) -> None:
        folder = self.folder(trainer)
        modality = self._modality(result.inputs)
        title = f"{self.method}, epoch {result.epoch}"
        k = min(self.top_k, len(result.names))
        top = result.top(k)
        if modality == "image" and result.input_attributions.ndim == 4:
            amap = result.importance.reshape(result.input_attributions.shape[1:]).sum(dim=0)
            fig = plots.new_figure(figsize=(3.2, 3.0))
            ax = fig.add_subplot(1, 1, 1)
            image = ax.imshow(amap.numpy(), cmap="inferno")
            fig.colorbar(image, ax=ax)
            ax.set_title(f"mean |attribution| ({title})", fontsize=8)
            ax.axis("off")
        else:
            fig = plots.importance_figure([t["feature"] for t in top], [t["score"] for t in top], f"Top {k} features ({title})")
        save_figure(trainer, fig, folder / "feature_importance.png", tag="explain/feature_importance")
        self._figures["feature_importance"] = str(folder / "feature_importance.png")
        m = min(self.num_heatmaps, len(result.inputs))
        captions = self._captions(result, m)
        if modality == "image" and result.input_attributions.ndim == 4:
            rgb = plots.overlays(result.inputs[:m], result.input_attributions[:m])
            grid = plots.heatmap_grid(rgb, captions, title)
            save_figure(trainer, grid, folder / "heatmaps.png", tag="explain/heatmaps")
            self._figures["heatmaps"] = str(folder / "heatmaps.png")
            plots.save_overlays(folder / "heatmaps", rgb)
            for logger in trainer.loggers:
                if type(logger).__name__ == "TensorBoardLogger":
                    logger.experiment.add_images("explain/overlays", rgb.astype(np.float32), result.step, dataformats="NHWC")
        elif modality == "text":
            vocab = None
            datamodule = getattr(trainer, "datamodule", None)
            for attr in ("vocab", "itos", "id_to_token"):
                vocab = vocab if vocab is not None else getattr(datamodule, attr, None)
            tokens = plots.tokens_of(result.inputs[:m], vocab)
            page = plots.token_html(tokens, result.input_attributions[:m].float().numpy(), captions, title)
            (folder / "tokens.html").write_text(page)
            self._figures["tokens_html"] = str(folder / "tokens.html")
            for logger in trainer.loggers:
                if type(logger).__name__ == "TensorBoardLogger":
                    logger.experiment.add_text("explain/tokens", page, result.step)

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample": None if self.sample is None else self.sample.state(),
            "reference": self.reference,
            "previous": self.previous,
            "previous_before": self._previous_before,
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sample = state_dict.get("sample")
        self.sample = None if sample is None else FixedSample.from_state(sample)
        self.reference = state_dict.get("reference")
        self.previous = state_dict.get("previous")
        self._previous_before = state_dict.get("previous_before")
        self.history = list(state_dict.get("history", []))
