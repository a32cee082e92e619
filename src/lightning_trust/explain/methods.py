"""Captum attribution methods by name, their options, baselines, and the chunked Captum calls.

Captum does the math; this module only maps a YAML-friendly name to the Captum class, splits the
user's options between the class's constructor and its ``attribute``, builds baselines, and calls
``attribute`` (plus Captum's ``infidelity`` and ``sensitivity_max``) chunk by chunk.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> explainer = build_explainer("integrated_gradients", model, options={"n_steps": 8})
    >>> split_options("integrated_gradients", {"n_steps": 8})
    ({}, {'n_steps': 8})
    >>> found = attribute("saliency", model, torch.randn(5, 4), chunk_slices(5, 2), targets=torch.zeros(5, dtype=torch.long))
    >>> found.attributions.shape, found.delta, found.infidelity
    (torch.Size([5, 4]), None, None)
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from captum.attr import (
    DeepLift,
    DeepLiftShap,
    FeatureAblation,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    LayerIntegratedGradients,
    Occlusion,
    Saliency,
    ShapleyValueSampling,
)
from torch import Tensor, nn

from lightning_trust.core.calls import ScoresModule
from lightning_trust.explain.inputs import resolve_layer


@dataclass(frozen=True)
class MethodSpec:
    """How a Captum method is called: its class, whether it takes a ``layer``, what baseline it takes
    (``None``: none, ``"single"``: a reference per input, ``"distribution"``: a set of references) and
    whether it returns a convergence delta."""

    cls: type[Any]
    layer: bool = False
    baseline: Optional[str] = "single"
    delta: bool = False


METHODS: dict[str, MethodSpec] = {
    "integrated_gradients": MethodSpec(IntegratedGradients, delta=True),
    "saliency": MethodSpec(Saliency, baseline=None),
    "input_x_gradient": MethodSpec(InputXGradient, baseline=None),
    "deeplift": MethodSpec(DeepLift, delta=True),
    "deeplift_shap": MethodSpec(DeepLiftShap, baseline="distribution", delta=True),
    "gradient_shap": MethodSpec(GradientShap, baseline="distribution", delta=True),
    "occlusion": MethodSpec(Occlusion),
    "feature_ablation": MethodSpec(FeatureAblation),
    "shapley_value_sampling": MethodSpec(ShapleyValueSampling),
    "layer_gradcam": MethodSpec(LayerGradCam, layer=True, baseline=None),
    "layer_integrated_gradients": MethodSpec(LayerIntegratedGradients, layer=True, delta=True),
}

#: Named baselines; anything else is a number (a constant input) or a path to a tensor file. Token
#: inputs take ``"pad"``/``"mask"`` (that token's id at every unpadded position) or
#: ``"zero_embedding"`` (layer methods: an all-zero input embedding).
BASELINES: tuple[str, ...] = ("zeros", "mean", "blur", "train", "pad", "mask", "zero_embedding")
#: Baselines only token inputs take.
TOKEN_BASELINES: tuple[str, ...] = ("pad", "mask", "zero_embedding")
#: ``attribute`` arguments the callback sets itself.
_MANAGED = {"inputs", "baselines", "target", "additional_forward_args", "return_convergence_delta"}


def _params(fn: Any) -> set[str]:
    return {p for p in inspect.signature(fn).parameters if p not in ("self", "kwargs")}


def split_options(method: str, options: Optional[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``options`` into the Captum class's constructor and ``attribute`` keyword arguments.

    Raises ``ValueError`` naming the unknown options and the accepted ones.
    """
    spec = METHODS[method]
    init_names = _params(spec.cls) - {"forward_func", "model", "layer"}  # the constructor's signature
    call_names = _params(spec.cls.attribute) - _MANAGED
    init, call, unknown = {}, {}, []
    for name, value in (options or {}).items():
        if name in call_names:
            call[name] = (
                tuple(value) if name in ("sliding_window_shapes", "strides") and isinstance(value, list) else value
            )
        elif name in init_names:
            init[name] = value
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for method {method!r} (captum.attr.{spec.cls.__name__}); accepted: "
            f"{sorted(init_names | call_names)}."
        )
    if method == "occlusion" and "sliding_window_shapes" not in call:
        raise ValueError(
            "method 'occlusion' needs `method_kwargs: {sliding_window_shapes: [...]}` (the occluded patch per "
            "sample, e.g. [1, 2, 2] for 1x8x8 images or [1] for tabular rows)."
        )
    return init, call


def build_explainer(
    method: str, module: nn.Module, layer: Union[str, nn.Module, None] = None, options: Optional[dict] = None
) -> Any:
    """The Captum explainer for ``method`` on ``module``; a module returning a ``ModelOutput``, a dict or
    a tuple is explained through its scores (:class:`~lightning_trust.core.calls.ScoresModule`), and
    ``layer`` is the layer itself or a path in the user's module."""
    spec = METHODS[method]
    init, _ = split_options(method, options)
    user = ScoresModule.unwrap(module)
    scores = module if isinstance(module, ScoresModule) else ScoresModule(module)
    if spec.layer:
        found = layer if isinstance(layer, nn.Module) else resolve_layer(user, layer or "")
        return spec.cls(scores, found, **init)
    return spec.cls(scores, **init)


class EmbeddingForward(nn.Module):
    """``forward(embeddings, ids, *others)``: ``module(ids, *others)`` with ``layer``'s output replaced
    by ``embeddings``: integrated gradients over a layer's output from any baseline output (an
    all-zero embedding), the computation Captum's ``LayerIntegratedGradients`` makes for an input
    baseline."""

    def __init__(self, module: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.layer = layer

    def forward(self, embeddings: Tensor, ids: Tensor, *others: Tensor) -> Tensor:
        handle = self.layer.register_forward_hook(lambda _m, _i, _o: embeddings)
        try:
            return self.module(ids, *others)
        finally:
            handle.remove()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Each image blurred by a Gaussian of std ``sigma`` pixels (the "blur" baseline of Sturmfels et al.)."""
    if images.ndim != 4:
        raise ValueError(
            f"baseline='blur' is for images (N, C, H, W), got inputs of shape {tuple(images.shape)}; use 'zeros' or 'mean'."
        )
    radius = max(1, math.ceil(3 * sigma))
    grid = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def load_baseline(path: Union[str, Path]) -> Tensor:
    """A baseline tensor from a ``.pt``/``.pth`` (``torch.save``) or ``.npy`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Baseline file {str(path)!r} does not exist. `baseline` is one of {list(BASELINES)}, a number, or a "
            "path to a tensor saved with torch.save (.pt) or numpy.save (.npy)."
        )
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path))
    value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, Tensor):
        raise TypeError(f"Baseline file {str(path)!r} holds a {type(value).__name__}, expected a tensor.")
    return value


def make_baselines(
    kind: Union[str, float],
    inputs: Tensor,
    reference: Optional[Tensor],
    blur_sigma: float,
    distribution: bool,
) -> Tensor:
    """The baselines tensor for ``inputs``: one row per input, or a distribution of references
    (``distribution=True``, at least two rows as DeepLiftShap requires).

    ``reference``: training inputs (for "mean" and "train").
    """
    if isinstance(kind, (int, float)) and not isinstance(kind, bool):
        base = torch.full_like(inputs[:1], kind)
    elif kind == "zeros":
        base = torch.zeros_like(inputs[:1])
    elif kind == "mean":
        assert reference is not None
        base = reference.to(inputs.dtype).mean(dim=0, keepdim=True).to(inputs.device)
        if not inputs.is_floating_point():
            raise ValueError("baseline='mean' needs float inputs; token ids take 'zeros' (the pad id) or a number.")
    elif kind == "blur":
        base = gaussian_blur(inputs, blur_sigma)
    elif kind == "train":
        assert reference is not None
        base = reference.to(device=inputs.device, dtype=inputs.dtype)
    else:
        base = load_baseline(str(kind)).to(device=inputs.device, dtype=inputs.dtype)
        if base.shape == inputs.shape[1:]:
            base = base.unsqueeze(0)
        if base.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"Baseline file {kind!r} has shape {tuple(base.shape)}; expected one input {tuple(inputs.shape[1:])} "
                f"or a stack of them (K, {', '.join(map(str, inputs.shape[1:]))})."
            )
    if distribution:
        return base if base.shape[0] > 1 else base.expand(2, *base.shape[1:]).contiguous()
    if base.shape[0] == 1:
        return base.expand_as(inputs).contiguous()
    if base.shape[0] != inputs.shape[0]:
        return base.mean(dim=0, keepdim=True).expand_as(inputs).contiguous()  # a distribution as one reference
    return base


class Attributions(NamedTuple):
    """What :func:`attribute` returns: the attributions, the per-sample convergence delta (methods
    with one), and the mean ``infidelity`` and ``sensitivity_max`` (``None`` when not computed)."""

    attributions: Tensor
    delta: Optional[Tensor]
    infidelity: Optional[float]
    sensitivity_max: Optional[float]
    sensitivity_perturbations: int = 0  # perturbations ``sensitivity_max`` ran (``sensitivity_count`` sizes them)


def _explanation_func(explainer: Any, fixed_base: Optional[Tensor]) -> Callable[..., Tensor]:
    """``explainer.attribute`` for ``sensitivity_max``; a baseline distribution stays fixed (it is not
    expanded per perturbation)."""

    def explanation(x: Tensor, **kw: Any) -> Tensor:
        if fixed_base is not None:
            kw["baselines"] = fixed_base
        return explainer.attribute(x, **kw)

    return explanation


def chunk_slices(n: int, batch_size: Optional[int]) -> list[slice]:
    """``n`` samples in chunks of ``batch_size`` (``None``: one chunk)."""
    size = batch_size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def attribute(
    method: str,
    module: nn.Module,
    inputs: Tensor,
    chunks: list[slice],
    advance: Callable[[], None] = lambda: None,
    *,
    layer: Union[str, nn.Module, None] = None,
    options: Optional[Mapping[str, Any]] = None,
    baselines: Optional[Tensor] = None,
    targets: Optional[Tensor] = None,
    others: tuple[Tensor, ...] = (),
    zero_embedding: bool = False,
    infidelity_samples: int = 0,
    infidelity_noise: float = 0.1,
    sensitivity_samples: int = 0,
    sensitivity_radius: float = 0.02,
    sensitivity_count: Callable[[float, int], int] = lambda unit_seconds, count: count,
    proceed: Callable[[int, float], bool] = lambda done, seconds: True,
) -> Attributions:
    """``method``'s attributions of ``inputs`` chunk by chunk, with Captum's ``infidelity`` (Gaussian
    perturbations of std ``infidelity_noise``) and ``sensitivity_max`` (L-inf radius
    ``sensitivity_radius``) when their sample counts are positive. ``advance`` is called after each
    Captum call (a progress bar).

    ``others``: the module's other inputs (row-aligned with ``inputs``), passed to Captum as
    ``additional_forward_args``. ``zero_embedding``: a layer method's baseline is an all-zero output
    of ``layer`` (integrated gradients over that output; ``baselines`` is ignored).
    ``sensitivity_count(unit_seconds, sensitivity_samples)``: asked once, after every chunk's
    attributions, with the seconds of one ``sensitivity_max`` perturbation (one attribution of every
    chunk); returns the perturbations to run (0 skips it: ``sensitivity_max=None``).
    ``proceed(samples_done, seconds)``: asked before each chunk after the first (``seconds``: the chunks'
    time so far, attributions and infidelity); ``False`` stops there: every result is then over the
    chunks done, a prefix of ``inputs``.
    """
    from captum.metrics import infidelity, sensitivity_max

    spec = METHODS[method]
    module = module if isinstance(module, ScoresModule) else ScoresModule(module)
    if zero_embedding:
        if method != "layer_integrated_gradients":
            raise ValueError(f"baseline='zero_embedding' is for 'layer_integrated_gradients', not {method!r}.")
        found = layer if isinstance(layer, nn.Module) else resolve_layer(ScoresModule.unwrap(module), layer or "")
        with torch.no_grad():
            embedded = torch.cat([found(inputs[part]) for part in chunks]) if chunks else inputs
        explainer = IntegratedGradients(
            EmbeddingForward(module, found), **split_options(method, dict(options or {}))[0]
        )
        others, inputs = (inputs, *others), embedded
        baselines = torch.zeros_like(embedded)
    else:
        explainer = build_explainer(method, module, layer, dict(options or {}))
    _, call = split_options(method, dict(options or {}))
    per_sample_base = baselines is not None and spec.baseline == "single"
    attrs, deltas, infids, sens, calls = [], [], [], [], []
    attribution_seconds = chunk_seconds = 0.0
    done: list[slice] = []
    for part in chunks:
        if done and not proceed(done[-1].stop, chunk_seconds):
            break
        started = time.perf_counter()
        kwargs: dict[str, Any] = dict(call)
        if baselines is not None:
            kwargs["baselines"] = baselines[part] if per_sample_base else baselines
        if targets is not None:
            kwargs["target"] = targets[part]
        if others:
            kwargs["additional_forward_args"] = tuple(other[part] for other in others)
        if spec.delta:
            attr, delta = explainer.attribute(inputs[part], return_convergence_delta=True, **kwargs)
            deltas.append(delta.reshape(-1))
        else:
            attr = explainer.attribute(inputs[part], **kwargs)
        attrs.append(attr.detach())
        attribution_seconds += time.perf_counter() - started
        calls.append(kwargs)
        advance()
        if infidelity_samples > 0:

            def perturb(x: Tensor) -> tuple[Tensor, Tensor]:
                delta_x = torch.randn_like(x) * infidelity_noise
                return delta_x, x - delta_x

            value = infidelity(
                module, perturb, inputs[part], attr.detach(), target=kwargs.get("target"),
                additional_forward_args=kwargs.get("additional_forward_args"),
                n_perturb_samples=infidelity_samples, normalize=True,
            )  # fmt: skip
            infids.append(value.detach().reshape(-1))
            advance()
        chunk_seconds += time.perf_counter() - started
        done.append(part)
    count = 0  # sensitivity_max: after every attribution, sized to what is left
    if sensitivity_samples > 0:
        count = min(max(int(sensitivity_count(attribution_seconds, sensitivity_samples)), 0), sensitivity_samples)
    for part, kwargs in list(zip(done, calls)) if count else []:
        fixed_base = kwargs.pop("baselines", None) if spec.baseline == "distribution" else None
        value = sensitivity_max(
            _explanation_func(explainer, fixed_base), inputs[part], perturb_radius=sensitivity_radius,
            n_perturb_samples=count, **kwargs,
        )  # fmt: skip
        sens.append(value.detach().reshape(-1))
        advance()
    return Attributions(
        attributions=torch.cat(attrs),
        delta=torch.cat(deltas) if deltas else None,
        infidelity=float(torch.cat(infids).float().mean()) if infids else None,
        sensitivity_max=float(torch.cat(sens).float().mean()) if sens else None,
        sensitivity_perturbations=count if sens else 0,
    )
