"""Token-level predictions (language models): every labelled token is one prediction of its
sample's domain, so per-domain metrics are token accuracy, token NLL, token ECE.

A causal LM in the Hugging Face convention gets ``labels == input_ids`` and shifts them itself (the
logits at position ``t`` predict token ``t + 1``); a model given already-shifted targets (Lightning's
``LightningTransformer``, WikiText2 blocks) predicts its target at the same position. ``"auto"``
tells the two apart by whether the labels are the input ids; ``-100`` marks unlabelled tokens.

Example:
    >>> logits = torch.zeros(1, 3, 5); logits[0, 0, 2] = logits[0, 1, 4] = 1.0
    >>> ids = torch.tensor([[1, 2, 4]])
    >>> label_shift("auto", ids, ids)
    1
    >>> preds, target, index = align_tokens(logits, ids, torch.tensor([7]), shift=1)
    >>> preds.argmax(1).tolist(), target.tolist(), index.tolist()
    ([2, 4], [2, 4], [7, 7])
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

from lightning_trust.evaluation.text import IGNORE_INDEX, token_ids

__all__ = ["align_tokens", "check_label_shift", "is_token_level", "label_shift"]


def check_label_shift(value: Union[str, int]) -> Union[str, int]:
    """Validate the ``label_shift`` argument: ``"auto"``, ``0`` or ``1``."""
    if value not in ("auto", 0, 1) or isinstance(value, bool):
        raise ValueError(f"`label_shift` must be 'auto', 0 or 1, got {value!r}.")
    return value


def label_shift(setting: Union[str, int], inputs: Any, target: Any) -> int:
    """The shift between token logits and labels: ``setting`` when 0/1; for ``"auto"``, 1 when the
    labels are the input ids (the model shifts them, Hugging Face's causal-LM convention), else 0."""
    if setting != "auto":
        return int(setting)
    ids = token_ids(inputs)
    if ids is None or not isinstance(target, Tensor) or target.shape != ids.shape:
        return 0
    labelled = target != IGNORE_INDEX
    return int(bool(labelled.any()) and bool(torch.equal(target[labelled], ids[labelled].to(target.dtype))))


def is_token_level(preds: Tensor, target: Any) -> bool:
    """Whether ``preds``/``target`` are per token: logits ``(N, L, V)`` or flattened ``(N * L, V)``
    with a target ``(N, L)``."""
    if not isinstance(target, Tensor) or target.ndim != 2:
        return False
    return (preds.ndim == 3 and preds.shape[:2] == target.shape) or (
        preds.ndim == 2 and preds.shape[0] == target.numel() and target.shape[1] > 1
    )


def align_tokens(preds: Tensor, target: Tensor, index: Tensor, shift: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(predictions (M, V), targets (M,), domain indices (M,))`` of the labelled tokens: the
    logits at ``t`` against the label at ``t + shift``, each token in its sample's domain."""
    n, length = target.shape
    logits = preds.reshape(n, length, -1)
    if shift:
        logits, target = logits[:, :-shift], target[:, shift:]
    token_index = index.reshape(n, 1).expand(n, target.shape[1])
    keep = target != IGNORE_INDEX
    return logits[keep], target[keep], token_index[keep]
