"""What :class:`~lightning_trust.explain.Attribution` refuses at construction: unknown methods,
baselines and options, a ``layer`` where the method takes none (or none where it needs one), and
counts or scales out of range.

Example:
    >>> check_attribution_arguments(method="saliency", baseline="mean")
    Traceback (most recent call last):
    ...
    ValueError: method 'saliency' takes no baseline; leave `baseline` at 'zeros' (it is ignored).
    >>> check_attribution_arguments(method="layer_gradcam", layer="features.3")  # fine: returns None
"""

from __future__ import annotations

from typing import Any, Optional, Union

from lightning_trust.core.budget import check_max_overhead
from lightning_trust.explain.methods import BASELINES, METHODS, split_options

__all__ = ["check_attribution_arguments"]


def check_attribution_arguments(
    method: str = "integrated_gradients",
    num_samples: int = 32,
    target: Union[str, int] = "pred",
    baseline: Union[str, float] = "zeros",
    layer: Optional[str] = None,
    method_kwargs: Optional[dict[str, Any]] = None,
    batch_size: Optional[int] = None,
    infidelity_samples: int = 10,
    infidelity_noise: float = 0.1,
    sensitivity_samples: int = 5,
    sensitivity_radius: float = 0.02,
    top_k: int = 10,
    modality: str = "auto",
    num_heatmaps: int = 16,
    blur_sigma: float = 1.0,
    num_baselines: int = 16,
    figures: str = "report",
    sensitivity_at: str = "end",
    input: Optional[str] = None,
    max_overhead: Optional[float] = 0.05,
    max_new_tokens: int = 4,
) -> None:
    """Raise ``ValueError`` on the first argument of ``Attribution`` that cannot work, with what to
    set instead."""
    if method not in METHODS:
        raise ValueError(f"Unknown `method={method!r}`; choose one of {sorted(METHODS)}.")
    spec = METHODS[method]
    if spec.layer and not layer and method != "layer_integrated_gradients":  # that one finds the input embeddings
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
    if not (target in ("pred", "true") or (isinstance(target, int) and not isinstance(target, bool) and target >= 0)):
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
    if figures not in ("report", "every", "end", "never"):
        raise ValueError(f"`figures` must be 'report', 'every', 'end' or 'never', got {figures!r}.")
    if sensitivity_at not in ("every", "end"):
        raise ValueError(f"`sensitivity_at` must be 'every' or 'end', got {sensitivity_at!r}.")
    if input is not None and (not isinstance(input, str) or not input):
        raise ValueError(f"`input` names the attributed keyword input (e.g. 'input_ids'), got {input!r}.")
    check_max_overhead(max_overhead)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"`max_new_tokens` (tokens a causal LM generates) must be a positive integer, got {max_new_tokens!r}."
        )
