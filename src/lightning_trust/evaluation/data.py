"""Filter any map-style dataset by a domain side column, and hold domains out of a Lightning run.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.randn(6, 2), torch.zeros(6), torch.tensor([0, 1, 2, 0, 1, 3]))
    >>> DomainSubset(data, "site", keep=[0, 3], contract=BatchContract(columns={"site": 2})).indices
    [0, 3, 5]
    >>> hold = HoldOutDomain("native_region", held_out=["Asia"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, read_column

__all__ = ["DomainSubset", "HoldOutDomain", "domain_codes"]


def domain_codes(
    values: Sequence[Union[str, int]], key: str, categories: Optional[Mapping[str, Sequence[str]]]
) -> list[Any]:
    """Column values for domain names or codes: names map to their index in ``categories[key]``."""
    names = list(categories[key]) if isinstance(categories, Mapping) and key in categories else None
    codes: list[Any] = []
    for value in values:
        if isinstance(value, str) and names is not None:
            if value not in names:
                raise ValueError(
                    f"{value!r} is not a value of {key!r}; its values are {names} (or codes 0..{len(names) - 1})."
                )
            codes.append(names.index(value))
        else:
            codes.append(value)
    return codes


class DomainSubset(Subset):
    """The samples of ``dataset`` whose side column ``key`` is in ``keep`` (or not in ``exclude``).

    Works for any map-style dataset: the column is read with the batch contract, so tuple datasets
    name the column's position in ``batch_keys``. Raises when nothing is left.

    Args:
        dataset: a map-style dataset.
        key: side-column name (``"native_region"``).
        keep: column values to keep; or
        exclude: column values to drop.
        contract: the batch contract (default: the standard one).
    """

    def __init__(
        self,
        dataset: Dataset,
        key: str,
        keep: Optional[Sequence[Any]] = None,
        exclude: Optional[Sequence[Any]] = None,
        contract: Optional[BatchContract] = None,
    ) -> None:
        if (keep is None) == (exclude is None):
            raise ValueError("Give exactly one of `keep` and `exclude`.")
        if not hasattr(dataset, "__len__"):
            raise ValueError(f"DomainSubset needs a map-style dataset (with __len__), got {type(dataset).__name__}.")
        column = read_column(dataset, contract or BatchContract(), key)
        chosen = np.isin(column, np.asarray(list(keep if keep is not None else exclude)))  # type: ignore[arg-type]
        mask = chosen if keep is not None else ~chosen
        indices = np.flatnonzero(mask).tolist()
        if not indices:
            values = sorted(set(column.tolist()))
            raise ValueError(
                f"DomainSubset({key!r}, {'keep' if keep is not None else 'exclude'}="
                f"{list(keep if keep is not None else exclude)}) left no samples; the column has values {values}."  # type: ignore[arg-type]
            )
        super().__init__(dataset, indices)
        self.key = key


Split = Literal["train", "val", "test"]


class HoldOutDomain(Callback):
    """Leave domains out of training: the ``splits`` loaders drop samples whose ``domain_key`` is held out.

    The run stays an ordinary Lightning run (one per held-out domain, see
    :func:`lightning_trust.evaluation.lodo.leave_one_domain_out`); the test loader keeps every
    domain, so :class:`CrossDomainEvaluation` reports the held-out domain at test.

    Args:
        domain_key: side column with the domain.
        held_out: domains to hold out: names (``"Asia"``, via ``datamodule.categories``) or codes.
        splits: which loaders to filter (default: train and val, i.e. training-domain validation).
        batch_keys: batch contract overrides.

    Example:
        >>> trainer = pl.Trainer(callbacks=[HoldOutDomain("native_region", held_out=["Asia"])], logger=False)
    """

    def __init__(
        self,
        domain_key: str,
        held_out: list[Union[str, int]],
        splits: list[Split] = ["train", "val"],  # noqa: B006
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(domain_key, str) or not domain_key:
            raise ValueError(f"`domain_key` must be a side-column name, got {domain_key!r}.")
        if not isinstance(held_out, (list, tuple)) or not held_out:
            raise ValueError(f"`held_out` must be a non-empty list of domain names or codes, got {held_out!r}.")
        bad = [s for s in splits if s not in ("train", "val", "test")]
        if bad or not splits:
            raise ValueError(f"`splits` must be a non-empty list of 'train', 'val', 'test', got {splits!r}.")
        self.domain_key = domain_key
        self.held_out = list(held_out)
        self.splits = list(splits)
        self.batch_keys = batch_keys
        self._patched: list[tuple[Any, str, Any]] = []
        self.kept_sizes: dict[str, int] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        contract = BatchContract.resolve(self.batch_keys, trainer)
        datamodule = getattr(trainer, "datamodule", None)
        codes = domain_codes(self.held_out, self.domain_key, getattr(datamodule, "categories", None))
        owner = datamodule if datamodule is not None else pl_module
        for split in self.splits:
            name = f"{split}_dataloader"
            original = getattr(owner, name, None)
            if original is None or any(o is owner and n == name for o, n, _ in self._patched):
                continue
            own = owner.__dict__.get(name)  # an instance attribute to put back (usually none: a method)
            setattr(owner, name, self._filtered(original, split, codes, contract))
            self._patched.append((owner, name, own))

    def _filtered(
        self, original: Callable[[], Any], split: str, codes: list[Any], contract: BatchContract
    ) -> Callable[[], Any]:
        def loader() -> Any:
            source = original()
            if not isinstance(source, DataLoader):
                raise ValueError(
                    f"HoldOutDomain filters DataLoaders; `{split}_dataloader` returned {type(source).__name__}."
                )
            subset = DomainSubset(source.dataset, self.domain_key, exclude=codes, contract=contract)
            self.kept_sizes[split] = len(subset)
            return DataLoader(
                subset,
                batch_size=source.batch_size,
                shuffle=isinstance(source.sampler, RandomSampler),
                num_workers=source.num_workers,
                collate_fn=source.collate_fn,
                pin_memory=source.pin_memory,
                drop_last=source.drop_last,
                generator=source.generator,
                persistent_workers=source.persistent_workers,
            )

        return loader

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for owner, name, own in reversed(self._patched):
            if own is None:
                owner.__dict__.pop(name, None)  # the class's method shows again
            else:
                setattr(owner, name, own)
        self._patched = []
