"""Finding the user's dataloaders: the Trainer's own, else the datamodule's.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.zeros(4, 2)))
    >>> first_loader({"a": [loader]}) is loader, all_loaders([loader, {"b": loader}]) == [loader, loader]
    (True, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

__all__ = ["all_loaders", "find_loader", "first_loader", "split_loaders"]

_TRAINER_ATTRS = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders"}


def all_loaders(loaders: Any) -> list[DataLoader]:
    """Every DataLoader in what a Trainer or DataModule returns (a loader, a list or dict of them)."""
    if loaders is None:
        return []
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [found for loader in loaders for found in all_loaders(loader)]
    return []


def first_loader(loaders: Any) -> Optional[DataLoader]:
    """The first DataLoader in what a Trainer or DataModule returns, or ``None``."""
    found = all_loaders(loaders)
    return found[0] if found else None


def split_loaders(trainer: Any, split: str) -> list[DataLoader]:
    """The loaders of one split (``"train"``, ``"val"``, ``"test"``): the Trainer's when it has
    loaded them, else the datamodule's, else the LightningModule's own ``*_dataloader`` hook (a
    source without that split gives none)."""
    if split not in _TRAINER_ATTRS:
        raise ValueError(f"`split` must be one of {sorted(_TRAINER_ATTRS)}, got {split!r}.")
    loaders = all_loaders(getattr(trainer, _TRAINER_ATTRS[split], None))
    if loaders:
        return loaders
    for source in (getattr(trainer, "datamodule", None), getattr(trainer, "lightning_module", None)):
        loaders = _hook_loaders(source, f"{split}_dataloader")
        if loaders:
            return loaders
    return []


def _hook_loaders(source: Any, name: str) -> list[DataLoader]:
    method = getattr(source, name, None) if source is not None else None
    if not callable(method) or _is_base_hook(source, name):
        return []
    try:
        return all_loaders(method())
    except (NotImplementedError, TypeError, AttributeError, RuntimeError, MisconfigurationException):
        return []  # that source lacks the split


def find_loader(trainer: Any, splits: Sequence[str]) -> tuple[Optional[DataLoader], str]:
    """The first loader of the first of ``splits`` that has one, and that split's name."""
    for split in splits:
        loaders = split_loaders(trainer, split)
        if loaders:
            return loaders[0], split
    return None, ""


def _is_base_hook(source: Any, name: str) -> bool:
    """Whether ``source``'s hook is Lightning's default (which raises or returns nothing)."""
    import lightning.pytorch as pl

    hook = getattr(type(source), name, None)
    return any(hook is getattr(base, name, None) for base in (pl.LightningDataModule, pl.LightningModule))
