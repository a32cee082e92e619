"""Early refusals of the fairness callbacks: what a batch and the model's predictions must hold,
checked at setup, in the sanity pass or on one probe batch at the start of training (before any
optimizer step), each naming the column or shape and the fix.

Example:
    >>> import torch
    >>> from lightning_trust.core.batch import BatchContract
    >>> batch = {"x": torch.zeros(2, 3), "y": torch.tensor([0, 1]), "age": torch.tensor([31.5, 40.0])}
    >>> check_batch(BatchContract(), batch, ["age"], [None], "FairnessMetrics")
    Traceback (most recent call last):
    ...
    TypeError: FairnessMetrics: the sensitive feature 'age' holds torch.float32 values, not group codes. Pass integer codes 0..N-1 (bucket a continuous column first, e.g. age -> age_group) and name them with `datamodule.categories['age'] = [...]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_trust.core.batch import BatchContract, BatchKeyError
from lightning_trust.core.capture import ForwardCapture, step_predictions
from lightning_trust.core.loaders import split_loaders

__all__ = ["check_batch", "check_predictions", "predictions_of", "probe_batch", "require_step"]


def require_step(pl_module: pl.LightningModule, hook: str, who: str, fix: str) -> None:
    """Refuse a module without ``hook`` (``validation_step``/``test_step``): Lightning skips that loop."""
    if not is_overridden(hook, pl_module):
        raise RuntimeError(
            f"{who} measures in the loop of `{hook}`, which Lightning skips: {type(pl_module).__name__} defines no "
            f"`{hook}`. Add a `{hook}` (it may just call `self(...)` on the batch: the callback reuses that "
            f"forward){fix}."
        )


def _side(contract: BatchContract, batch: Any, name: str, who: str) -> Any:
    try:
        return contract.side(batch, name)
    except BatchKeyError as error:
        fix = "" if "batch_keys" in str(error) else (
            f" Yield dict (or tuple) batches that carry it and name it with `batch_keys: {{{name}: <key or position>}}`."
        )  # fmt: skip
        raise BatchKeyError(f"{who}: the sensitive feature {name!r} is missing. {error}{fix}") from error


def check_batch(
    contract: BatchContract, batch: Any, columns: Sequence[str], capacities: Sequence[Optional[int]], who: str
) -> None:
    """Every sensitive column present and integer codes within its groups, and a target present."""
    for name, capacity in zip(columns, capacities):
        value = _side(contract, batch, name, who)
        value = value if isinstance(value, Tensor) else torch.as_tensor(value)
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{who}: the sensitive feature {name!r} holds {value.dtype} values, not group codes. Pass integer "
                "codes 0..N-1 (bucket a continuous column first, e.g. age -> age_group) and name them with "
                f"`datamodule.categories[{name!r}] = [...]`."
            )
        if value.numel() and capacity is not None:
            low, high = int(value.min()), int(value.max())
            if low < 0 or high >= capacity:
                raise ValueError(
                    f"{who}: the sensitive feature {name!r} has the code {low if low < 0 else high}, outside its "
                    f"{capacity} groups 0..{capacity - 1}. Name every group in `datamodule.categories[{name!r}]`, or "
                    f"pass `num_groups={{{name!r}: <groups>}}` (codes must be 0..N-1)."
                )
    try:
        contract.target(batch)
    except BatchKeyError as error:
        raise BatchKeyError(
            f"{who} needs each sample's true label: {error} Yield (inputs, target, ...) tuples or dict batches and "
            "name the labels with `batch_keys: {target: <key or position>}`."
        ) from error


def check_predictions(preds: Tensor, target: Any, who: str) -> None:
    """One prediction (scores ``[B]`` or class logits ``[B, C]``) and one label per sample."""
    target = torch.as_tensor(target)
    if preds.ndim > 2 or (preds.ndim == 2 and target.ndim == 2 and target.shape[1] > 1):
        raise ValueError(
            f"{who} scores one prediction per sample, but the predictions have shape {tuple(preds.shape)} and the "
            f"labels {tuple(target.shape)}: per-token outputs (a language model's [batch, length, vocab] logits). "
            "Use a sequence-classification head (e.g. AutoModelForSequenceClassification) or return per-sample "
            "class logits [batch, classes] from the step (`return {'logits': ...}`)."
        )
    if preds.ndim >= 1 and target.numel() != preds.shape[0]:
        raise ValueError(
            f"{who}: {preds.shape[0]} predictions but {target.numel()} labels (shape {tuple(target.shape)}) in a "
            "batch. Return one label per sample in the batch's target (set `batch_keys: {target: <key>}`)."
        )


def probe_batch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Any]:
    """The first validation batch, on the module's device (``None`` without validation data): what
    the sanity pass would have shown, read at the start of training when it did not run."""
    loaders = split_loaders(trainer, "val")
    batch = next(iter(loaders[0]), None) if loaders else None
    return None if batch is None else pl_module.transfer_batch_to_device(batch, pl_module.device, 0)


def predictions_of(trainer: pl.Trainer, pl_module: pl.LightningModule, contract: BatchContract, batch: Any) -> Tensor:
    """The module's predictions on ``batch`` from one isolated forward (eval mode, no grad)."""
    return step_predictions(ForwardCapture(), contract, pl_module, batch, None, trainer)
