"""Image corruptions at severities 1-5 (ImageNet-C style) and the corruption error.

Every corruption works on a batch of images ``(N, C, H, W)`` (or ``(N, H, W)``) with values in
``value_range``, is deterministic for a given ``torch.Generator``, runs on the images' device and
leaves severity 0 as the identity. Parameters follow Hendrycks & Dietterich (2019) for the noise,
contrast and brightness corruptions; spatial ones (blur, pixelate, occlusion) are scaled to the
image size so that small images (8x8 digits, 32x32 CIFAR) degrade gradually too.

Example:
    >>> x = torch.rand(4, 1, 8, 8)
    >>> corrupt(x, "gaussian_noise", 3, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([4, 1, 8, 8])
    >>> torch.equal(corrupt(x, "blur", 0), x)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_trust.core.calls import PositionalInputs
from lightning_trust.evaluation.text import TEXT_CORRUPTIONS

__all__ = [
    "CORRUPTIONS",
    "DEFAULT_SEVERITIES",
    "SEVERITIES",
    "corrupt",
    "corrupt_inputs",
    "corruption_errors",
    "resolve_corruptions",
]

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: The severities evaluated by default: the mildest, the middle and the strongest, at 3/5 of the cost of all five.
DEFAULT_SEVERITIES: tuple[int, ...] = (1, 3, 5)

# severity 1..5 parameters
_GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)  # noise std
_SHOT = (60.0, 25.0, 12.0, 5.0, 3.0)  # photons per unit intensity
_IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)  # salt-and-pepper fraction
_SPECKLE = (0.15, 0.2, 0.35, 0.45, 0.6)  # multiplicative noise std
_BLUR = (0.05, 0.08, 0.11, 0.14, 0.18)  # gaussian sigma as a fraction of the image side (>= 0.4 px)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # contrast factor
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added intensity
_PIXELATE = (0.85, 0.7, 0.55, 0.4, 0.25)  # downsampled side as a fraction of the image side
_OCCLUSION = (0.15, 0.3, 0.45, 0.6, 0.75)  # occluding square side as a fraction of the image side


def _noise(x: Tensor, g: Optional[torch.Generator]) -> Tensor:
    return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _uniform(x: Tensor, g: Optional[torch.Generator]) -> Tensor:
    return torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)


def gaussian_noise(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    return x + _noise(x, g) * _GAUSSIAN[s - 1]


def shot_noise(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    c = _SHOT[s - 1]
    return torch.poisson(x.clamp(0, 1) * c, generator=g) / c


def impulse_noise(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    amount = _IMPULSE[s - 1]
    u = _uniform(x, g)
    x = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where(u > 1 - amount / 2, torch.ones_like(x), x)


def speckle_noise(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    return x + x * _noise(x, g) * _SPECKLE[s - 1]


def blur(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    sigma = max(0.4 * s / 2, _BLUR[s - 1] * min(x.shape[-2:]))
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, k.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def contrast(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _CONTRAST[s - 1] + mean


def brightness(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    return x + _BRIGHTNESS[s - 1]


def pixelate(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    h, w = x.shape[-2:]
    c = _PIXELATE[s - 1]
    small = F.interpolate(x, size=(max(1, round(h * c)), max(1, round(w * c))), mode="area")
    # bilinear back up: with nearest, sizes that divide the image evenly lose less than larger ones
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def occlusion(x: Tensor, s: int, g: Optional[torch.Generator]) -> Tensor:
    n, _, h, w = x.shape
    side = max(1, round(_OCCLUSION[s - 1] * min(h, w)))
    top = (torch.rand(n, generator=g, device=x.device) * (h - side + 1)).floor().long()
    left = (torch.rand(n, generator=g, device=x.device) * (w - side + 1)).floor().long()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1))
    inside = inside & (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1))
    return x.masked_fill(inside.unsqueeze(1), 0.0)


#: The corruption suite: name -> function(images in [0, 1] (N, C, H, W), severity 1..5, generator).
CORRUPTIONS: dict[str, Callable[[Tensor, int, Optional[torch.Generator]], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "blur": blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "occlusion": occlusion,
}


def corrupt(
    images: Tensor,
    name: str,
    severity: int,
    generator: Optional[torch.Generator] = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """``images`` with corruption ``name`` at ``severity`` (0 = unchanged), clipped to ``value_range``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; the suite has: {', '.join(CORRUPTIONS)}.")
    if not isinstance(severity, int) or not 0 <= severity <= 5:
        raise ValueError(f"`severity` must be an int in 0..5, got {severity!r}.")
    if not isinstance(images, Tensor) or images.ndim not in (3, 4) or not images.is_floating_point():
        raise ValueError(
            "Corruptions need float image inputs of shape (N, C, H, W) or (N, H, W), got "
            f"{type(images).__name__}{tuple(getattr(images, 'shape', ()))}. Use `corruptions` only with image data."
        )
    if severity == 0:
        return images
    lo, hi = value_range
    x = images.unsqueeze(1) if images.ndim == 3 else images
    x = (x - lo) / (hi - lo)
    out = CORRUPTIONS[name](x, severity, generator).clamp(0.0, 1.0) * (hi - lo) + lo
    return out.squeeze(1) if images.ndim == 3 else out


def corrupt_inputs(
    inputs: Any, name: str, severity: int, generator: torch.Generator, value_range: tuple[float, float]
) -> Any:
    """A batch's inputs with an image corruption: the tensor itself, a dict's ``pixel_values`` (the
    other model inputs kept) or the first of positional inputs."""
    if isinstance(inputs, PositionalInputs):
        return PositionalInputs((corrupt_inputs(inputs[0], name, severity, generator, value_range), *inputs[1:]))
    if isinstance(inputs, Mapping) and "pixel_values" in inputs:
        return {**inputs, "pixel_values": corrupt(inputs["pixel_values"], name, severity, generator, value_range)}
    return corrupt(inputs, name, severity, generator, value_range)


def resolve_corruptions(corruptions: object) -> list[str]:
    """The corruption names from ``None``, ``"all"`` (the image suite; the text suite for token
    inputs, resolved at setup), one name or a list of names (validated)."""
    if corruptions is None:
        return []
    if isinstance(corruptions, str):
        names = list(CORRUPTIONS) if corruptions == "all" else [corruptions]
    elif isinstance(corruptions, Sequence):
        names = list(corruptions)
    else:
        raise ValueError(f"`corruptions` must be 'all', a name or a list of names, got {corruptions!r}.")
    unknown = [n for n in names if n not in CORRUPTIONS and n not in TEXT_CORRUPTIONS]
    if unknown:
        raise ValueError(
            f"Unknown corruption(s) {unknown}; the image suite has: {', '.join(CORRUPTIONS)}; the text suite has: "
            f"{', '.join(TEXT_CORRUPTIONS)} (or 'all')."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`corruptions` lists a corruption twice: {names}.")
    return names


def corruption_errors(
    clean_error: float,
    errors: Mapping[str, Mapping[int, float]],
    baseline: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """ImageNet-C corruption errors from top-1 errors per corruption and severity.

    Without a baseline: ``ce_c`` is the mean error over severities and ``relative_ce_c`` the mean of
    ``E_{s,c} - E_clean``. With a baseline (the ``corruption_errors`` block this function writes
    for another model): ``CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}`` and
    ``relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)``; ``mCE`` and
    relative ``mCE`` are the means over corruptions. Returns plain floats.
    """
    per: dict[str, dict[str, Any]] = {}
    base_errors = baseline.get("errors", {}) if baseline else {}
    base_clean = float(baseline["clean_error"]) if baseline else float("nan")
    if baseline is not None:
        missing = [c for c in errors if c not in base_errors]
        if missing:
            raise ValueError(
                f"`baseline_errors` has no errors for corruption(s) {missing}; rerun the baseline with them."
            )
    for name, by_severity in errors.items():
        sev = sorted(by_severity)
        e = [float(by_severity[s]) for s in sev]
        entry: dict[str, Any] = {"errors": {str(s): v for s, v in zip(sev, e)}}
        if baseline is None:
            entry["ce"] = sum(e) / len(e)
            entry["relative_ce"] = sum(v - clean_error for v in e) / len(e)
        else:
            b_by = {int(k): float(v) for k, v in base_errors[name].items()}
            if any(s not in b_by for s in sev):
                raise ValueError(f"`baseline_errors` lacks severities {sev} of {name!r}; it has {sorted(b_by)}.")
            b = [b_by[s] for s in sev]
            entry["ce"] = sum(e) / sum(b) if sum(b) > 0 else float("nan")
            denominator = sum(v - base_clean for v in b)
            entry["relative_ce"] = sum(v - clean_error for v in e) / denominator if denominator > 0 else float("nan")
        per[name] = entry
    mean = lambda key: sum(float(v[key]) for v in per.values()) / len(per) if per else float("nan")  # noqa: E731
    return {
        "clean_error": float(clean_error),
        "normalized": baseline is not None,
        "corruption_error": mean("ce"),
        "relative_corruption_error": mean("relative_ce"),
        "per_corruption": per,
        "errors": {name: dict(v["errors"]) for name, v in per.items()},
    }
