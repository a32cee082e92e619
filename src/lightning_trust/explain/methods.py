"""Captum attribution methods by name, their options, and baselines.

Captum does the math; this module only maps a YAML-friendly name to the Captum class, splits the
user's options between the class's constructor and its ``attribute``, and builds baselines.

Example:
    >>> spec = METHODS["integrated_gradients"]
    >>> explainer = build_explainer("integrated_gradients", model, options={"n_steps": 32})
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

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


@dataclass(frozen=True)
class MethodSpec:
    """How a Captum method is called: its class, whether it takes a ``layer``, what baseline it takes
    (``None``: none, ``"single"``: a reference per input, ``"distribution"``: a set of references) and
    whether it returns a convergence delta."""

    cls: type
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

#: Named baselines; anything else is a number (a constant input) or a path to a tensor file.
BASELINES: tuple[str, ...] = ("zeros", "mean", "blur", "train")
#: ``attribute`` arguments the callback sets itself.
_MANAGED = {"inputs", "baselines", "target", "additional_forward_args", "return_convergence_delta"}


def _params(fn: Any) -> set[str]:
    return {p for p in inspect.signature(fn).parameters if p not in ("self", "kwargs")}


def split_options(method: str, options: Optional[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``options`` into the Captum class's constructor and ``attribute`` keyword arguments.

    Raises ``ValueError`` naming the unknown options and the accepted ones.
    """
    spec = METHODS[method]
    init_names = _params(spec.cls.__init__) - {"forward_func", "model", "layer"}
    call_names = _params(spec.cls.attribute) - _MANAGED
    init, call, unknown = {}, {}, []
    for name, value in (options or {}).items():
        if name in call_names:
            call[name] = tuple(value) if name in ("sliding_window_shapes", "strides") and isinstance(value, list) else value
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


def resolve_layer(module: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` (``"features.3"``), with a clear error listing candidates."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n][:30]
        raise ValueError(f"`layer={path!r}` is not a submodule of {type(module).__name__}; some of its modules: {names}.")


def build_explainer(method: str, module: nn.Module, layer: Optional[str] = None, options: Optional[dict] = None) -> Any:
    """The Captum explainer for ``method`` on ``module`` (a callable ``nn.Module`` returning scores)."""
    spec = METHODS[method]
    init, _ = split_options(method, options)
    if spec.layer:
        return spec.cls(module, resolve_layer(module, layer or ""), **init)
    return spec.cls(module, **init)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Each image blurred by a Gaussian of std ``sigma`` pixels (the "blur" baseline of Sturmfels et al.)."""
    if images.ndim != 4:
        raise ValueError(
            f"baseline='blur' is for images (N, C, H, W), got inputs of shape {tuple(images.shape)}; use 'zeros' or 'mean'."
        )
    radius = max(1, int(math.ceil(3 * sigma)))
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
