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
    loaded them, else the datamodule's (a datamodule without that split gives none)."""
    if split not in _TRAINER_ATTRS:
        raise ValueError(f"`split` must be one of {sorted(_TRAINER_ATTRS)}, got {split!r}.")
    loaders = all_loaders(getattr(trainer, _TRAINER_ATTRS[split], None))
    if loaders:
        return loaders
    datamodule = getattr(trainer, "datamodule", None)
    method = getattr(datamodule, f"{split}_dataloader", None) if datamodule is not None else None
    if not callable(method) or _is_base_hook(datamodule, f"{split}_dataloader"):
        return []
    try:
        return all_loaders(method())
    except (NotImplementedError, TypeError, AttributeError, RuntimeError):  # the datamodule lacks that split
        return []


def find_loader(trainer: Any, splits: Sequence[str]) -> tuple[Optional[DataLoader], str]:
    """The first loader of the first of ``splits`` that has one, and that split's name."""
    for split in splits:
        loaders = split_loaders(trainer, split)
        if loaders:
            return loaders[0], split
    return None, ""


def _is_base_hook(datamodule: Any, name: str) -> bool:
    import lightning.pytorch as pl

    return getattr(type(datamodule), name, None) is getattr(pl.LightningDataModule, name, None)
