"""The result of one explanation pass: attributions in input space, feature names, the files
written, and the rank correlation that measures drift between passes.

Example:
    >>> import torch
    >>> rank_correlation(torch.tensor([0.1, 0.5, 0.2, 0.9]), torch.tensor([1.0, 3.0, 2.0, 5.0]))
    1.0
    >>> feature_names(torch.zeros(2, 1, 2, 2), "image")
    ['pixel(0,0)', 'pixel(0,1)', 'pixel(1,0)', 'pixel(1,1)']
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_trust.core.output import write_json

__all__ = [
    "Explanation",
    "feature_names",
    "patch_scores",
    "rank_correlation",
    "sample_captions",
    "to_input_space",
    "write_files",
]


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
    mask: Optional[Tensor] = None  # token inputs: 1 at the real tokens, 0 at padding (excluded)
    tokens: Optional[list[list[str]]] = None  # token inputs: each sample's unpadded token strings
    patches: Optional[Tensor] = None  # vision transformers: attribution summed per patch (N, H/p, W/p)
    generated: Optional[list[list[str]]] = None  # causal LMs: each sample's generated target tokens
    token_attr: Optional[list[Tensor]] = None  # causal LMs: per sample (generated x prompt tokens)
    sensitivity_perturbations: int = 0  # perturbations sensitivity_max ran (fewer than configured: budget)
    samples_total: Optional[int] = None  # the fixed sample's size: more than len(inputs) when cut to the budget

    @property
    def samples_explained(self) -> int:
        """The samples this pass explained (a prefix of the fixed sample); every aggregate is over them."""
        return len(self.inputs)

    def token_scores(self) -> Optional[list[list[dict[str, Any]]]]:
        """Each sample's ``[{"token", "score"}]`` over its unpadded tokens (``None`` unless token inputs)."""
        if self.tokens is None:
            return None
        out = []
        for i, words in enumerate(self.tokens):
            row = self.input_attributions[i]
            keep = self.mask[i].bool() if self.mask is not None else torch.ones(len(row), dtype=torch.bool)
            scores = row[keep].tolist()
            out.append([{"token": w, "score": float(v)} for w, v in zip(words, scores)])
        return out

    @property
    def convergence_delta(self) -> Optional[float]:
        """Mean absolute convergence delta over the sample (``None`` for methods without one)."""
        return None if self.delta is None else float(self.delta.abs().mean())

    def top(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` most important features, ``[{"feature": name, "score": mean |attribution|}]``."""
        order = torch.argsort(self.importance, descending=True, stable=True)[:k]
        return [{"feature": self.names[i], "score": float(self.importance[i])} for i in order.tolist()]


def sample_captions(sample: Any, result: Explanation, m: int) -> list[str]:
    """Captions of the first ``m`` samples: ``#<dataset index> y=<label> t=<explained target>``."""
    captions = []
    for i in range(m):
        parts = [f"#{sample.indices[i] if sample else i}"]
        if sample is not None and sample.targets is not None and sample.targets.ndim == 1:
            parts.append(f"y={int(sample.targets[i])}")
        if result.targets is not None and result.targets.ndim == 1:
            parts.append(f"t={int(result.targets[i])}")
        captions.append(" ".join(parts))
    return captions


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


def to_input_space(
    attributions: Tensor, inputs: Tensor, modality: str, method: str, mask: Optional[Tensor] = None
) -> Tensor:
    """Attributions per input feature: summed over the embedding for tokens (0 at the padding ``mask``
    marks), a Grad-CAM map upsampled to the image size, else as Captum returned them."""
    if modality == "text" and attributions.ndim > 2:
        per_token = attributions.sum(dim=tuple(range(2, attributions.ndim)))
        return per_token if mask is None else per_token * mask.to(per_token.device).bool()
    if modality == "text" and mask is not None and attributions.shape == mask.shape:
        return attributions * mask.to(attributions.device).bool()
    if method == "layer_gradcam" and modality == "image" and attributions.shape[-2:] != inputs.shape[-2:]:
        from captum.attr import LayerAttribution

        return LayerAttribution.interpolate(attributions, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
    return attributions


def patch_scores(input_attr: Tensor, patch_size: int) -> Tensor:
    """Image attributions (N, C, H, W) summed over channels and each ``patch_size`` square: (N, H/p, W/p),
    the vision transformer's patch grid."""
    n, _, h, w = input_attr.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"The images ({h}x{w}) do not divide into {p}x{p} patches.")
    return input_attr.sum(dim=1).reshape(n, h // p, p, w // p, p).sum(dim=(2, 4))


def feature_names(
    input_attr: Tensor,
    modality: str,
    given: Optional[Sequence[str]] = None,
    datamodule_names: Optional[Sequence[str]] = None,
) -> list[str]:
    """Names of the flattened features of ``input_attr`` (N, ...): the user's ``given`` names, else
    the datamodule's ``feature_names`` when their count fits, else ``token[t]``, ``pixel(r,c)``,
    ``c<channel>(r,c)`` or ``x[i]``. Raises when ``given`` names the wrong number of features."""
    count = int(input_attr[0].numel())
    for candidate in (given, datamodule_names):
        if candidate is not None and len(candidate) == count:
            return [str(c) for c in candidate]
    if given is not None:
        raise ValueError(f"`feature_names` has {len(given)} names but the attributions have {count} features.")
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


def write_files(
    folder: Path, result: Explanation, method: str, history: list[dict[str, Any]], indices: Sequence[int]
) -> dict[str, str]:
    """Write ``importance.csv``/``.json``, ``history.json`` and ``attributions.pt``; returns their paths."""
    order = torch.argsort(result.importance, descending=True, stable=True).tolist()
    with open(folder / "importance.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "feature", "score"])
        for rank, i in enumerate(order, start=1):
            writer.writerow([rank, result.names[i], f"{float(result.importance[i]):.8g}"])
    write_json(folder / "importance.json", {
        "method": method, "stage": result.stage, "epoch": result.epoch, "step": result.step,
        "importance": [{"feature": result.names[i], "score": float(result.importance[i])} for i in order],
    })  # fmt: skip
    write_json(folder / "history.json", history)
    torch.save({
        "indices": list(indices), "inputs": result.inputs, "targets": result.targets, "baselines": result.baselines,
        "attributions": result.attributions, "delta": result.delta, "names": result.names, "epoch": result.epoch,
    }, folder / "attributions.pt")  # fmt: skip
    return {k: str(folder / v) for k, v in (
        ("importance_csv", "importance.csv"), ("importance_json", "importance.json"),
        ("history", "history.json"), ("attributions", "attributions.pt"),
    )}  # fmt: skip
