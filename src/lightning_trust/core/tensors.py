"""Walking nested collections of tensors, and turning results into plain JSON.

One walker for the whole pack, on Lightning's own ``apply_to_collection`` (mappings, lists,
tuples, namedtuples, dataclasses and Hugging Face ``ModelOutput`` objects alike).

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "mask": [torch.zeros(2, 5)]}
    >>> map_tensors(batch, lambda t: t[:1])["input_ids"].shape
    torch.Size([1, 5])
    >>> first_tensor(batch).shape, len(list(iter_tensors(batch)))
    (torch.Size([2, 5]), 2)
    >>> to_jsonable({"eps": torch.tensor(2.5), "nan": float("nan"), "shape": (1, 2)}, strict=True)
    {'eps': 2.5, 'nan': None, 'shape': [1, 2]}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor

__all__ = ["first_tensor", "iter_tensors", "map_tensors", "tensor_bytes", "to_jsonable"]


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``fn`` applied to every tensor inside ``value``; the containers are rebuilt as they were."""
    return apply_to_collection(value, Tensor, fn)


def iter_tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside ``value``, in container order (mapping values, then sequence items)."""
    found: list[Tensor] = []
    apply_to_collection(value, Tensor, found.append)
    yield from found


def first_tensor(value: Any, min_ndim: int = 0) -> Optional[Tensor]:
    """The first tensor inside ``value`` with at least ``min_ndim`` dimensions, or ``None``."""
    return next((t for t in iter_tensors(value) if t.ndim >= min_ndim), None)


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by the distinct tensors inside ``tensors`` (a tensor shared twice counts once)."""
    seen: set[int] = set()
    total = 0
    for t in iter_tensors(list(tensors) if not isinstance(tensors, (Tensor, Mapping)) else tensors):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def to_jsonable(value: Any, strict: bool = False) -> Any:
    """Plain JSON types: tensors and numpy values as numbers or lists, paths as strings, tuples as
    lists, keys as strings, anything else unknown by its ``str``. ``strict=True`` also turns NaN
    and infinities into ``None`` (strict JSON has no NaN: the model card is written so)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, strict) for v in value]
    if isinstance(value, Tensor):
        return to_jsonable(value.item() if value.ndim == 0 else value.tolist(), strict)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return None if strict and not math.isfinite(value) else value
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return to_jsonable(value.item(), strict)  # numpy scalar
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist(), strict)
    return str(value)
