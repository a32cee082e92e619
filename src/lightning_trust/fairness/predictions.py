"""From a model's outputs to what fairness is computed on: class scores, the positive-class
score and hard (0/1 or class index) predictions.

The predictions of a validation/test step come from core's
:func:`~lightning_trust.core.capture.step_predictions` (the step's outputs, else the forward the
step ran, else one isolated forward).

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> y_true, y_pred, classes = hard_predictions(logits, torch.tensor([0, 1]), "auto", 1, 0.5)
    >>> y_true.tolist(), y_pred.tolist(), classes
    ([0, 1], [0, 1], 2)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "check_activation", "class_scores", "hard_predictions", "positive_score"]

Activation = Literal["auto", "softmax", "sigmoid", "none"]
ACTIVATIONS: tuple[str, ...] = ("auto", "softmax", "sigmoid", "none")


def check_activation(activation: str) -> str:
    """``activation`` if it is one of :data:`ACTIVATIONS`, else a ``ValueError``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be auto, softmax, sigmoid or none, got {activation!r}.")
    return activation


def class_scores(preds: Tensor, activation: str) -> Tensor:
    """Scores in [0, 1]: ``[B]`` (binary, the positive class score) or ``[B, C]`` (one per class).

    ``activation``: "auto" = softmax over a class dimension of 2+, sigmoid for a single logit;
    "softmax", "sigmoid" or "none" (already probabilities) as named.
    """
    preds = preds.float()
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim not in (1, 2):
        raise ValueError(
            f"Predictions of shape {tuple(preds.shape)} are neither per-sample scores [B] nor class logits [B, C]."
        )
    if activation == "none":
        return preds
    if activation == "sigmoid" or (activation == "auto" and preds.ndim == 1):
        return torch.sigmoid(preds)
    if preds.ndim == 1:
        raise ValueError("`activation='softmax'` needs class logits [B, C]; got per-sample scores [B].")
    return torch.softmax(preds, dim=1)


def positive_score(scores: Tensor, positive_label: int) -> Tensor:
    """The positive class score from :func:`class_scores` output (``[B]`` passes through)."""
    if scores.ndim == 1:
        return scores
    if scores.shape[1] != 2:
        raise ValueError(f"A positive-class score needs 2 classes; the predictions have {scores.shape[1]}.")
    if positive_label not in (0, 1):
        raise ValueError(f"`positive_label` must be 0 or 1 for 2-class logits, got {positive_label}.")
    return scores[:, positive_label]


def hard_predictions(
    preds: Tensor, target: Tensor, activation: str, positive_label: int, threshold: float
) -> tuple[Tensor, Tensor, int]:
    """(y_true, y_pred, num_classes): 0/1 arrays for binary predictions, class indices for multiclass.

    All on the predictions' device, no host synchronisation.
    """
    scores = class_scores(preds, activation)
    target = target.reshape(-1).to(scores.device).long()
    if scores.ndim == 1 or scores.shape[1] == 2:
        positive = positive_score(scores, positive_label)
        return (target == positive_label).long(), (positive >= threshold).long(), 2
    return target, scores.argmax(dim=1), int(scores.shape[1])
