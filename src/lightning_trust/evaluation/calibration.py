"""Calibration beyond ECE: temperature scaling (Guo et al., 2017) fitted by LBFGS on the NLL, and
ECE, adaptive ECE, NLL and Brier score before and after, per cell (overall, groups, domains).

ECE is torchmetrics' ``MulticlassCalibrationError`` (equal-width bins, L1); adaptive ECE
(Nguyen & O'Connor 2015, "ACE") uses equal-mass bins of the top-class confidence; NLL and Brier
are :mod:`~lightning_trust.evaluation.metrics`' count-state metrics. All are torchmetrics objects
whose states are reduced across processes.

Example:
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> labels = torch.tensor([0, 1, 1, 0])  # half right at 98% confidence: overconfident
    >>> fit_temperature(logits, labels) > 10
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.utilities.data import dim_zero_cat

from lightning_trust.evaluation.metrics import BrierScore, NegativeLogLikelihood
from lightning_trust.evaluation.results import reliability_bins

__all__ = ["CALIBRATION_METRICS", "AdaptiveCalibrationError", "CalibrationCells", "fit_temperature"]

#: The reported calibration metrics, in order.
CALIBRATION_METRICS: tuple[str, ...] = ("ece", "adaptive_ece", "nll", "brier")


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimizing the NLL of ``softmax(logits / T)`` (LBFGS on ``log T``,
    as Guo et al.'s reference code optimizes ``T`` with LBFGS on the validation NLL)."""
    if logits.shape[0] == 0:
        raise ValueError("Temperature scaling needs at least one calibration sample.")
    # validate/test run under inference mode: leave it, and copy the (inference) tensors out of it
    with torch.inference_mode(False), torch.enable_grad():
        logits, labels = logits.detach().double().cpu().clone(), labels.detach().long().cpu().clone()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
    return float(log_t.detach().exp())


class AdaptiveCalibrationError(Metric):
    """Adaptive (equal-mass) ECE of the top-class confidence: ``n_bins`` bins holding equal shares of
    the samples sorted by confidence, ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``.

    Example:
        >>> m = AdaptiveCalibrationError(n_bins=2)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]), torch.tensor([0, 1, 1, 1]))
        >>> round(float(m.compute()), 4)  # bins {0.6, 0.7}: acc 1 conf .65; {0.8, 0.9}: acc .5 conf .85
        0.35
    """

    full_state_update = False
    higher_is_better = False
    confidences: list[Tensor]
    accuracies: list[Tensor]

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
        self.n_bins = n_bins
        self.add_state("confidences", [], dist_reduce_fx="cat")
        self.add_state("accuracies", [], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        confidence, predicted = probs.max(dim=1)
        self.confidences.append(confidence.float())
        self.accuracies.append((predicted == target.long()).float())

    def compute(self) -> Tensor:
        confidence = dim_zero_cat(self.confidences)
        accuracy = dim_zero_cat(self.accuracies)
        n = confidence.numel()
        if n == 0:
            return torch.tensor(float("nan"))
        order = torch.argsort(confidence, stable=True)
        bins = torch.div(torch.arange(n, device=confidence.device) * self.n_bins, n, rounding_mode="floor")
        total = torch.zeros((), dtype=torch.float64, device=confidence.device)
        for b in range(self.n_bins):
            inside = order[bins == b]
            if inside.numel():
                gap = (accuracy[inside].double().mean() - confidence[inside].double().mean()).abs()
                total = total + gap * inside.numel() / n
        return total


def _metrics(num_classes: int, n_bins: int) -> dict[str, Metric]:
    return {
        "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=n_bins, norm="l1", validate_args=False),
        "adaptive_ece": AdaptiveCalibrationError(n_bins=n_bins),
        "nll": NegativeLogLikelihood(),
        "brier": BrierScore(),
    }


class CalibrationCells:
    """The calibration metrics of each cell, before (``T = 1``) and after temperature scaling."""

    def __init__(self, names: Sequence[str], num_classes: int, n_bins: int, device: torch.device) -> None:
        self.names = list(names)
        self.metrics = {
            phase: [{k: m.to(device) for k, m in _metrics(num_classes, n_bins).items()} for _ in self.names]
            for phase in ("before", "after")
        }

    def update(self, logits: Tensor, target: Tensor, membership: Tensor, temperature: Optional[float]) -> None:
        phases = {"before": logits.float().softmax(dim=1)}
        if temperature is not None:
            phases["after"] = (logits.float() / temperature).softmax(dim=1)
        for phase, probs in phases.items():
            for c in range(len(self.names)):
                mask = membership[:, c]
                if bool(mask.any()):
                    for metric in self.metrics[phase][c].values():
                        metric.update(probs[mask], target[mask])

    def compute(self, sizes: Sequence[int], fitted: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """``({cell: {before: {...}, after: {...}}}, {cell: reliability bins before and after})``;
        every process computes (the metrics' states are synced), empty cells give ``None``."""
        values: dict[str, Any] = {}
        bins: dict[str, Any] = {}
        for c, name in enumerate(self.names):
            values[name], bins[name] = {}, {}
            for phase in ("before", "after"):
                if sizes[c] == 0 or (phase == "after" and not fitted):
                    values[name][phase] = dict.fromkeys(CALIBRATION_METRICS)
                    continue
                metrics = self.metrics[phase][c]
                values[name][phase] = {k: float(m.compute()) for k, m in metrics.items()}
                bins[name][phase] = reliability_bins(metrics["ece"])
        return values, bins
