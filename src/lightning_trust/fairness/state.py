"""The per-sample state :class:`~lightning_trust.fairness.ThresholdOptimizer` needs: labels,
predictions, group codes and scores, gathered from every rank once per epoch (fairlearn's
``ThresholdOptimizer.fit`` places per-group thresholds on the scores themselves).
:class:`~lightning_trust.fairness.FairnessMetrics` keeps counts instead
(:mod:`~lightning_trust.fairness.counts`).

Example:
    >>> import torch
    >>> state = FairnessState()
    >>> state.update(torch.tensor([1, 0]), torch.tensor([1, 1]), torch.tensor([[0], [1]]))
    >>> y_true, y_pred, groups, scores = state.compute()
    >>> y_pred.tolist(), groups.shape, scores is None
    ([1, 1], torch.Size([2, 1]), True)
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["FairnessState"]


class FairnessState(Metric):
    """Streaming state for group fairness: per-sample true/predicted labels and group codes.

    Accumulated on the device with no host sync; ``compute()`` gathers every rank's samples once
    (``dist_reduce_fx="cat"``, uneven sizes handled by torchmetrics) and returns them as tensors.
    """

    full_state_update = False
    # the states add_state registers (lists of per-batch tensors until gathered)
    y_true: list[Tensor]
    y_pred: list[Tensor]
    groups: list[Tensor]
    scores: list[Tensor]

    def __init__(self, keep_scores: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_scores = keep_scores
        self.add_state("y_true", default=[], dist_reduce_fx="cat")
        self.add_state("y_pred", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, y_true: Tensor, y_pred: Tensor, groups: Tensor, scores: Optional[Tensor] = None) -> None:
        """Add one batch: labels, predictions, ``[B, columns]`` group codes (and scores)."""
        self.y_true.append(y_true.reshape(-1).long())
        self.y_pred.append(y_pred.reshape(-1).long())
        self.groups.append(groups.long())
        if self.keep_scores:
            if scores is None:
                raise ValueError("FairnessState(keep_scores=True).update needs `scores`.")
            self.scores.append(scores.reshape(-1).float())

    def compute(self) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """``(y_true, y_pred, groups, scores or None)`` of every rank's samples."""
        scores = dim_zero_cat(self.scores) if self.keep_scores else None
        return dim_zero_cat(self.y_true), dim_zero_cat(self.y_pred), dim_zero_cat(self.groups), scores

    def local(self) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Like :meth:`compute`, but this rank's samples only (no gather)."""
        scores = dim_zero_cat(self.scores) if self.keep_scores else None
        return dim_zero_cat(self.y_true), dim_zero_cat(self.y_pred), dim_zero_cat(self.groups), scores
