"""Metrics by name for per-domain evaluation: torchmetrics objects (with their DDP-reduced states).

Names: ``"accuracy"``, ``"f1"``, ``"auroc"``, ``"ece"`` (expected calibration error), ``"nll"``
(negative log-likelihood, :class:`NegativeLogLikelihood`), ``"brier"``, or any torchmetrics class
path (``"torchmetrics.classification.MulticlassPrecision"``). Every metric receives class
probabilities of shape ``(N, C)``; a metric whose class name starts with ``Binary`` (and the
two-class ``"f1"``/``"auroc"``) receives the positive-class probability instead.

Example:
    >>> spec = MetricSpec.from_name("ece", {"n_bins": 10})
    >>> metric = spec.build(num_classes=3)
    >>> type(metric).__name__
    'MulticlassCalibrationError'
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["NAMED_METRICS", "BrierScore", "MetricSpec", "NegativeLogLikelihood", "to_probabilities"]

#: Short metric names and what they build (two-class variant, multiclass variant).
NAMED_METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("torchmetrics.classification.MulticlassAccuracy", "torchmetrics.classification.MulticlassAccuracy"),
    "f1": ("torchmetrics.classification.BinaryF1Score", "torchmetrics.classification.MulticlassF1Score"),
    "auroc": ("torchmetrics.classification.BinaryAUROC", "torchmetrics.classification.MulticlassAUROC"),
    "ece": (
        "torchmetrics.classification.MulticlassCalibrationError",
        "torchmetrics.classification.MulticlassCalibrationError",
    ),
    "nll": ("lightning_trust.evaluation.metrics.NegativeLogLikelihood",) * 2,
    "brier": ("lightning_trust.evaluation.metrics.BrierScore",) * 2,
}
#: Defaults per short name (the user's ``metric_args`` override them).
_NAMED_DEFAULTS: dict[str, dict[str, Any]] = {
    "accuracy": {"average": "micro"},
    "f1": {"average": "macro"},
    "auroc": {"average": "macro"},
    "ece": {"n_bins": 15, "norm": "l1"},
}


class NegativeLogLikelihood(Metric):
    """Mean negative log-likelihood of the true class, ``-mean(log p[y])`` (sklearn's ``log_loss``).

    Args:
        eps: probabilities are clipped to ``[eps, 1]`` before the log.

    Example:
        >>> m = NegativeLogLikelihood()
        >>> m.update(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([0, 0]))
        >>> round(float(m.compute()), 4)
        0.3993
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total: Tensor  # states registered with add_state
    count: Tensor

    def __init__(self, eps: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < eps < 1:
            raise ValueError(f"`eps` must be in (0, 1), got {eps}.")
        self.eps = eps
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        p = probs.gather(1, target.long().reshape(-1, 1)).clamp(self.eps, 1.0)
        self.total += -torch.log(p.double()).sum()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class BrierScore(Metric):
    """Multiclass Brier score: mean over samples of ``sum_c (p_c - 1[y = c])^2``."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total: Tensor  # states registered with add_state
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        onehot = torch.nn.functional.one_hot(target.long(), probs.shape[1]).to(probs.dtype)
        self.total += ((probs - onehot) ** 2).sum().double()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


def _import(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        module_name, attr = "torchmetrics", path
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"Unknown metric {path!r}: use one of {sorted(NAMED_METRICS)} or a torchmetrics class path such as "
            "'torchmetrics.classification.MulticlassPrecision'."
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise ValueError(f"Metric {path!r} is not a torchmetrics `Metric` subclass (got {cls!r}).")
    return cls


@dataclass
class MetricSpec:
    """How to build one named metric for a given number of classes."""

    name: str
    paths: tuple[str, str]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_name(cls, name: str, kwargs: Optional[dict[str, Any]] = None) -> MetricSpec:
        """Validate ``name`` (a short name or a class path) and its extra init ``kwargs`` now."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"A metric is named by a string, got {name!r}.")
        if name in NAMED_METRICS:
            spec = cls(name, NAMED_METRICS[name], {**_NAMED_DEFAULTS.get(name, {}), **(kwargs or {})})
            for path in set(spec.paths):
                _import(path)
            return spec
        if "." not in name:
            raise ValueError(
                f"Unknown metric {name!r}: use one of {sorted(NAMED_METRICS)} or a torchmetrics class path "
                "(e.g. 'torchmetrics.classification.MulticlassPrecision')."
            )
        _import(name)
        return cls(name.rpartition(".")[2], (name, name), dict(kwargs or {}))

    def build(self, num_classes: int) -> Metric:
        """A fresh metric object; ``num_classes`` and ``validate_args=False`` are passed where accepted."""
        path = self.paths[0] if num_classes == 2 else self.paths[1]
        metric_cls = _import(path)
        params = inspect.signature(metric_cls).parameters  # the constructor's
        kwargs = dict(self.kwargs)
        if "num_classes" in params:
            kwargs.setdefault("num_classes", num_classes)
        if "validate_args" in params:
            kwargs.setdefault("validate_args", False)  # validation costs a host sync per update
        if self.name in NAMED_METRICS and "average" not in params:
            kwargs.pop("average", None)  # the binary variants have no `average`
        try:
            return metric_cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"Cannot build metric {self.name!r} ({path}) with {kwargs}: {err}") from err

    @staticmethod
    def takes_positive_probability(metric: Metric) -> bool:
        """Binary torchmetrics classes take the positive-class probability, not ``(N, C)``."""
        return type(metric).__name__.startswith("Binary")


def higher_is_better(metric: Metric) -> bool:
    """Whether larger values are better (torchmetrics' ``higher_is_better``; ``True`` when unset)."""
    value = getattr(metric, "higher_is_better", None)
    return True if value is None else bool(value)


def to_probabilities(predictions: Tensor, prediction_type: str = "logits") -> Tensor:
    """``(N, C)`` class probabilities from logits (softmax, or sigmoid for one column) or probabilities."""
    preds = predictions.detach()
    if preds.ndim == 1 or (preds.ndim == 2 and preds.shape[1] == 1):
        p1 = preds.reshape(-1).float()
        if prediction_type == "logits":
            p1 = torch.sigmoid(p1)
        return torch.stack([1 - p1, p1], dim=1)
    if preds.ndim != 2:
        raise ValueError(
            f"CrossDomainEvaluation expects predictions of shape (N, C) or (N,), got {tuple(preds.shape)}; return "
            "class scores from `validation_step` (e.g. {'logits': ...}) or from the module's forward."
        )
    preds = preds.float()
    return preds.softmax(dim=1) if prediction_type == "logits" else preds
