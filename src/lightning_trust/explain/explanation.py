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

__all__ = ["Explanation", "feature_names", "rank_correlation", "to_input_space", "write_files"]


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
        """Mean absolute convergence delta over the sample (``None`` for methods without one)."""
        return None if self.delta is None else float(self.delta.abs().mean())

    def top(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` most important features, ``[{"feature": name, "score": mean |attribution|}]``."""
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


def to_input_space(attributions: Tensor, inputs: Tensor, modality: str, method: str) -> Tensor:
    """Attributions per input feature: summed over the embedding for tokens, a Grad-CAM map upsampled
    to the image size, else as Captum returned them."""
    if modality == "text" and attributions.ndim > 2:
        return attributions.sum(dim=tuple(range(2, attributions.ndim)))  # per token
    if method == "layer_gradcam" and modality == "image" and attributions.shape[-2:] != inputs.shape[-2:]:
        from captum.attr import LayerAttribution

        return LayerAttribution.interpolate(attributions, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
    return attributions


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
