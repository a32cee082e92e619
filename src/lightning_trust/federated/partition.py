"""Split any map-style dataset into clients: ``IID``, ``Dirichlet(alpha)`` label skew, ``ByKey(name)``.

Labels and side columns are read through the batch contract, so tuple and dict datasets work
alike (``ByKey("native_region")`` on Adult gives one client per region).

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> labels = torch.arange(100) % 2
    >>> dataset = TensorDataset(torch.randn(100, 3), labels)
    >>> parts = Dirichlet(alpha=0.5).split(dataset, num_clients=4, seed=0)  # sizes differ, labels are skewed
    >>> sorted(i for p in parts for i in p) == list(range(100))  # every sample in exactly one client
    True
    >>> summary = partition_summary(parts, labels.numpy())
    >>> summary["sizes"] == [len(p) for p in parts], len(summary["label_histograms"])
    (True, 4)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
from torch.utils.data import Dataset

from lightning_trust.core.batch import BatchContract, read_column

__all__ = [
    "IID",
    "ByKey",
    "Dirichlet",
    "Partitioner",
    "partition_summary",
    "read_column",
    "resolve_partition",
    "split_clients",
]


class Partitioner:
    """Base class: ``split(dataset, num_clients, seed, contract)`` returns each client's sorted indices."""

    #: ``True`` when the number of clients follows from the data (``ByKey``).
    infers_num_clients: bool = False

    def split(
        self, dataset: Dataset, num_clients: Optional[int], seed: int = 0, contract: Optional[BatchContract] = None
    ) -> list[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def client_names(self) -> Optional[list[str]]:
        """Human-readable client names, when the partition has them (``ByKey``)."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _check_num_clients(num_clients: Optional[int], n: int) -> int:
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"`num_clients` must be a positive integer, got {num_clients!r}.")
    if num_clients > n:
        raise ValueError(f"Cannot split {n} samples into {num_clients} clients; use at most {n} clients.")
    return num_clients


class IID(Partitioner):
    """A uniformly random split into clients of (nearly) equal size."""

    def split(
        self, dataset: Dataset, num_clients: Optional[int], seed: int = 0, contract: Optional[BatchContract] = None
    ) -> list[list[int]]:
        n = len(dataset)  # type: ignore[arg-type]
        k = _check_num_clients(num_clients, n)
        perm = np.random.default_rng(seed).permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(perm, k)]


class Dirichlet(Partitioner):
    """Label skew (Hsu et al., 2019): each class is spread over clients by proportions drawn from
    ``Dirichlet(alpha)``; small ``alpha`` = each client sees few classes.

    Args:
        alpha: concentration (> 0); large values approach IID.
        min_samples: redraw until every client has at least this many samples (up to 100 tries).
    """

    def __init__(self, alpha: float = 0.5, min_samples: int = 1) -> None:
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"`alpha` must be > 0, got {alpha!r}.")
        if not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"`min_samples` must be a positive integer, got {min_samples!r}.")
        self.alpha = float(alpha)
        self.min_samples = min_samples

    def split(
        self, dataset: Dataset, num_clients: Optional[int], seed: int = 0, contract: Optional[BatchContract] = None
    ) -> list[list[int]]:
        labels = read_column(dataset, contract or BatchContract(), "target")
        k = _check_num_clients(num_clients, len(labels))
        return self.split_labels(labels, k, seed)

    def split_labels(self, labels: np.ndarray, num_clients: int, seed: int = 0) -> list[list[int]]:
        """The partition of samples with these ``labels``."""
        rng = np.random.default_rng(seed)
        for _ in range(100):
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for c in np.unique(labels):
                idx = np.flatnonzero(labels == c)
                rng.shuffle(idx)
                props = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
                for client, chunk in enumerate(np.split(idx, cuts)):
                    parts[client].extend(chunk.tolist())
            if min(len(p) for p in parts) >= self.min_samples:
                return [sorted(p) for p in parts]
        raise ValueError(
            f"Dirichlet(alpha={self.alpha}) left a client with fewer than {self.min_samples} samples in 100 draws; "
            "raise `alpha`, lower `num_clients` or `min_samples`."
        )


class ByKey(Partitioner):
    """The natural partition by a side column of the batch contract: one client per distinct value
    (Adult by ``native_region`` or ``race``), clients in sorted value order.

    Args:
        key: side-column name read with the batch contract (map it with ``batch_keys``).
    """

    infers_num_clients = True

    def __init__(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"`key` must be a side-column name, got {key!r}.")
        self.key = key
        self._values: Optional[list[Any]] = None

    def split(
        self, dataset: Dataset, num_clients: Optional[int], seed: int = 0, contract: Optional[BatchContract] = None
    ) -> list[list[int]]:
        column = read_column(dataset, contract or BatchContract(), self.key)
        values = np.unique(column)
        if num_clients is not None and num_clients != len(values):
            raise ValueError(
                f"ByKey({self.key!r}) gives {len(values)} clients (values {values.tolist()}), but num_clients="
                f"{num_clients}; set `num_clients: null` (or {len(values)})."
            )
        self._values = values.tolist()
        return [np.flatnonzero(column == v).tolist() for v in values]

    def client_names(self) -> Optional[list[str]]:
        return None if self._values is None else [f"{self.key}={v}" for v in self._values]


_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:[(:]\s*([^)]*?)\s*\)?)?\s*$")


def resolve_partition(partition: Union[str, Partitioner]) -> Partitioner:
    """A :class:`Partitioner` from an instance or a spec string: ``"iid"``, ``"dirichlet(0.5)"``
    (or ``"dirichlet:0.5"``), ``"by_key(native_region)"``."""
    if isinstance(partition, Partitioner):
        return partition
    match = _SPEC.match(partition) if isinstance(partition, str) else None
    if match:
        kind, arg = match.group(1), match.group(2)
        if kind == "iid" and not arg:
            return IID()
        if kind == "dirichlet":
            try:
                return Dirichlet(float(arg)) if arg else Dirichlet()
            except ValueError as err:
                raise ValueError(f"Bad partition {partition!r}: {err}") from err
        if kind in ("by_key", "bykey", "key") and arg:
            return ByKey(arg.strip("'\""))
    raise ValueError(
        f"Unknown partition {partition!r}; use 'iid', 'dirichlet(<alpha>)', 'by_key(<side column>)' or a "
        "Partitioner instance (IID(), Dirichlet(alpha=0.5), ByKey('native_region'))."
    )


def partition_summary(
    parts: Sequence[Sequence[int]], labels: Optional[np.ndarray] = None, names: Optional[list[str]] = None
) -> dict[str, Any]:
    """Per-client sizes and (when ``labels`` are given) label histograms, as plain JSON."""
    summary: dict[str, Any] = {"sizes": [len(p) for p in parts]}
    if names is not None:
        summary["names"] = list(names)
    if labels is not None and len(labels):
        classes = np.unique(labels)
        summary["classes"] = classes.tolist()
        summary["label_histograms"] = [
            [int((labels[np.asarray(p, dtype=np.int64)] == c).sum()) for c in classes] for p in parts
        ]
    return summary


def split_clients(
    dataset: Dataset,
    partitioner: Partitioner,
    num_clients: Optional[int],
    seed: int,
    contract: BatchContract,
    expected_sizes: Optional[Sequence[int]] = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Each client's indices of ``dataset`` and the partition's summary (for the report).

    Refuses a client without samples, and, when resuming (``expected_sizes`` from the
    checkpoint), a partition of other sizes than the one the run was trained on.
    """
    parts = partitioner.split(dataset, num_clients, seed=seed, contract=contract)
    sizes = [len(p) for p in parts]
    if expected_sizes is not None and sizes != list(expected_sizes):
        raise RuntimeError(
            f"The checkpoint was trained on client partitions of sizes {list(expected_sizes)}, but the data now "
            f"partitions into {sizes}: resume with the same dataset, partition, num_clients and seed."
        )
    if any(size == 0 for size in sizes):
        empty = [i for i, size in enumerate(sizes) if not size]
        raise ValueError(f"Clients {empty} got no samples from {partitioner!r}; use fewer clients.")
    try:
        labels: Optional[np.ndarray] = read_column(dataset, contract, "target")
    except (KeyError, TypeError, ValueError, RuntimeError):
        labels = None
    return parts, {"partition": repr(partitioner), **partition_summary(parts, labels, partitioner.client_names())}
