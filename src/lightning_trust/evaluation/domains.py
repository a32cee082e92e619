"""Which domains a run evaluates: the values of a side column, extra named datasets, and how each
sample finds its domain.

Example:
    >>> import torch
    >>> index = DomainIndex([3, 0, 7])  # the evaluated column values, in domain order
    >>> index(torch.tensor([0, 7, 5, 3])).tolist()  # 5 is not evaluated: index len(codes)
    [1, 2, 3, 0]
    >>> safe_name("Latin America / Caribbean")
    'Latin_America_Caribbean'
    >>> in_domain_names(["United-States"], ["United-States", "Asia"], [0, 1], ["United-States", "Asia"])
    ['United-States']
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_trust.core.batch import BatchContract, read_column
from lightning_trust.core.loaders import first_loader, split_loaders

__all__ = [
    "DomainIndex",
    "discover_values",
    "domain_names",
    "extra_domain_loader",
    "in_domain_names",
    "safe_name",
    "side_domains",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


def safe_name(name: str) -> str:
    """A domain name usable in a metric key and a file name."""
    return _UNSAFE.sub("_", str(name)).strip("_") or "domain"


def side_domains(
    domain_key: str, domain_values: Optional[Sequence[Any]], trainer: Any, contract: BatchContract
) -> tuple[list[Any], list[str]]:
    """``(column codes, domain names)`` of the side column ``domain_key``: the given ``domain_values``
    (names or codes), else every value of ``datamodule.categories[domain_key]``, else the values
    found in the validation data (:func:`discover_values`)."""
    categories = getattr(getattr(trainer, "datamodule", None), "categories", None)
    names_of = list(categories[domain_key]) if isinstance(categories, Mapping) and domain_key in categories else None
    values = list(domain_values) if domain_values is not None else None
    if values is None:
        values = list(range(len(names_of))) if names_of is not None else discover_values(domain_key, trainer, contract)
    codes: list[Any] = []
    names: list[str] = []
    for value in values:
        if isinstance(value, str) and names_of is not None and value in names_of:
            codes.append(names_of.index(value))  # a name given for a coded column
            names.append(value)
        elif isinstance(value, int) and names_of is not None:
            if not 0 <= value < len(names_of):
                raise ValueError(
                    f"`domain_values` has code {value}, but {domain_key!r} has codes 0..{len(names_of) - 1} "
                    f"({names_of})."
                )
            codes.append(value)
            names.append(str(names_of[value]))
        else:
            codes.append(value)
            names.append(str(value))
    if not codes:
        raise ValueError(f"No values of the domain column {domain_key!r} to evaluate; set `domain_values`.")
    return codes, names


def discover_values(domain_key: str, trainer: Any, contract: BatchContract) -> list[Any]:
    """The sorted distinct values of ``domain_key`` in the validation data: the datamodule's
    ``val_dataset``, else the dataset of the first validation loader (the Trainer's or datamodule's,
    else the LightningModule's own ``val_dataloader``)."""
    dataset = getattr(getattr(trainer, "datamodule", None), "val_dataset", None)
    if dataset is None:
        loader = next(iter(split_loaders(trainer, "val")), None)
        dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(
            f"Cannot find the values of the domain column {domain_key!r}: the DataModule has no "
            f"`categories[{domain_key!r}]` and no `val_dataset`. Set `domain_values: [...]`."
        )
    column = read_column(dataset, contract, domain_key)
    return sorted(set(column.tolist()))


def domain_names(clean: Sequence[str], extra: Sequence[str], corrupted: Sequence[str]) -> list[str]:
    """Every evaluated domain, in order: the validation/test data's own, the extra domains, the
    corrupted copies; a name may appear only once."""
    names = [*clean, *extra, *corrupted]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Domain names must be unique; {duplicates} appear twice. Rename the extra `domains`.")
    return names


def in_domain_names(
    in_domain: Optional[Sequence[Union[str, int]]],
    names: Sequence[str],
    side_codes: Sequence[Any],
    side_names: Sequence[str],
    extra: Sequence[str] = (),
    domain_key: Optional[str] = "domain",
    base_domain: str = "clean",
    other_sources: bool = False,
) -> list[str]:
    """The in-distribution domains among ``names``. ``in_domain`` holds domain names or column
    codes; by default the side-column domains are in-domain when extra domains or corruptions
    (``other_sources``) exist, and the validation data (``base_domain``) without a ``domain_key``."""
    if in_domain is None:
        if domain_key is None:
            return [base_domain]
        return list(side_names) if (extra or other_sources) else []
    resolved = []
    for value in in_domain:
        if isinstance(value, str) and value in names:
            resolved.append(value)
        elif value in side_codes:
            resolved.append(side_names[list(side_codes).index(value)])
        elif str(value) in names:
            resolved.append(str(value))
        else:
            codes = ", ".join(f"{n!r} (code {c!r})" for c, n in zip(side_codes, side_names))
            raise ValueError(
                f"`in_domain` value {value!r} is not a domain. Domains: {codes or ''}"
                f"{', ' if codes and extra else ''}{', '.join(map(repr, extra))}{' ' if codes or extra else ''}"
                f"{'(and ' + repr(base_domain) + ')' if not domain_key else ''}."
            )
    return resolved


class DomainIndex:
    """Maps a batch's domain column to each sample's domain index (``len(codes)`` for values not
    evaluated), on the column's device and without a host sync for numeric columns."""

    def __init__(self, codes: Sequence[Any]) -> None:
        self.codes = list(codes)
        self._lookup: Optional[tuple[Tensor, Tensor]] = None

    def __call__(self, column: Any, device: Optional[torch.device] = None) -> Tensor:
        k = len(self.codes)
        if isinstance(column, (list, tuple)) and column and isinstance(column[0], str):
            lookup = {c: i for i, c in enumerate(self.codes)}
            return torch.tensor([lookup.get(v, k) for v in column], dtype=torch.long, device=device)
        column = torch.as_tensor(column, device=device).reshape(-1)
        if self._lookup is None or self._lookup[0].device != column.device:
            sorted_codes, order = torch.tensor(self.codes, device=column.device).sort()
            self._lookup = (sorted_codes, order)
        sorted_codes, order = self._lookup
        sorted_codes = sorted_codes.to(column.dtype)
        pos = torch.searchsorted(sorted_codes, column).clamp(max=k - 1)  # no host sync
        return torch.where(sorted_codes[pos] == column, order[pos], torch.full_like(pos, k))


def extra_domain_loader(name: str, source: Any, trainer: Any, pl_module: Any, batch_size: Optional[int]) -> DataLoader:
    """An unshuffled loader over the extra domain ``name``'s data. ``source`` is a ``Dataset``, a
    ``DataLoader`` (or a list/dict of them: the first), a callable returning one, or the name of a
    DataModule/LightningModule attribute or method such as ``"test_dataloader"``. Under DDP each
    process gets its own share, without padding duplicates."""
    if isinstance(source, str):
        owners = [o for o in (getattr(trainer, "datamodule", None), pl_module) if o is not None]
        owner = next((o for o in owners if hasattr(o, source)), None)
        if owner is None:
            raise ValueError(
                f"Extra domain {name!r}: neither the DataModule nor the LightningModule has an attribute or "
                f"method {source!r} (e.g. 'test_dataloader' or 'test_dataset')."
            )
        source = getattr(owner, source)
    if callable(source) and not isinstance(source, (Dataset, DataLoader)):
        source = source()
    if not isinstance(source, Dataset):
        source = first_loader(source) or source
    collate: Any = None
    if isinstance(source, DataLoader):
        dataset, size, collate = source.dataset, source.batch_size or 1, source.collate_fn
    elif isinstance(source, Dataset):
        dm_batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        dataset = source
        size = batch_size or (dm_batch if isinstance(dm_batch, int) else 256)
    else:
        raise ValueError(f"Extra domain {name!r} must give a Dataset or a DataLoader, got {type(source).__name__}.")
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            f"Extra domain {name!r} needs a map-style dataset (with __len__), got {type(dataset).__name__}."
        )
    if trainer.world_size > 1:
        dataset = Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))
    kwargs: dict[str, Any] = {"collate_fn": collate} if collate is not None else {}
    return DataLoader(dataset, batch_size=size, shuffle=False, **kwargs)
