"""Token-level targets under DP: the assumption that the loss is a mean of per-sample losses.

DP-SGD's add/remove-one sensitivity holds when each sample's gradient depends on that sample alone.
A Hugging Face causal-LM (or token-classification) loss is the mean over every predicted token of
the batch, so a sample's gradient is scaled by the batch's total token count: removing one sample
changes the others' unclipped gradients. Clipping still bounds each sample's contribution, but the
accountant's ε then rests on an assumption the loss does not meet. :func:`token_level_targets` spots
such batches (integer targets with a token dimension), and :class:`TokenLossCheck` warns once and
lists ``per_sample_loss`` under the report's ``unmet_assumptions`` unless the user declares
``per_sample_loss=True`` (each sample's loss is its own token mean, then averaged over samples).

Example:
    >>> import torch
    >>> token_level_targets({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long)})
    True
    >>> token_level_targets((torch.ones(2, 3), torch.tensor([0, 1])))
    False
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_trust.core.batch import DEFAULT_TARGET_KEYS
from lightning_trust.core.output import warn_once

__all__ = ["PER_SAMPLE_LOSS_FIX", "TokenLossCheck", "token_level_targets"]

PER_SAMPLE_LOSS_FIX = (
    "compute the loss per sample (e.g. `F.cross_entropy(logits.transpose(1, 2), labels, reduction='none', "
    "ignore_index=-100)`, each row's mean over its own labelled tokens, then the mean over the batch) and pass "
    "`DifferentialPrivacy(per_sample_loss=True)` to declare it"
)


def _target_of(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return next((batch[key] for key in DEFAULT_TARGET_KEYS if key in batch), None)
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def token_level_targets(batch: Any) -> bool:
    """Whether ``batch`` holds integer targets with a token dimension (``labels`` of shape ``(B, L)``)."""
    target = _target_of(batch)
    return (
        isinstance(target, torch.Tensor)
        and target.dim() >= 2
        and not target.dtype.is_floating_point
        and target.dtype != torch.bool
    )


class TokenLossCheck:
    """Looks at the first training batch of a fit; remembers whether the per-sample-loss assumption is unmet."""

    def __init__(self, per_sample_loss: bool) -> None:
        self.per_sample_loss = per_sample_loss
        self.unmet = False
        self._checked = False

    def check(self, owner: Any, batch: Any) -> None:
        if self._checked:
            return
        self._checked = True
        if self.per_sample_loss or not token_level_targets(batch):
            return
        self.unmet = True
        warn_once(
            owner,
            "token_level_loss",
            "DifferentialPrivacy: the batches hold token-level targets (`labels` of shape (batch, tokens)). A loss "
            "that averages over every token of the batch (Hugging Face's own `.loss`) scales each sample's gradient "
            "by the batch's token count, so the reported ε assumes a per-sample loss the run may not have; the "
            f"report lists `per_sample_loss` under `unmet_assumptions`. To meet it, {PER_SAMPLE_LOSS_FIX}.",
        )
