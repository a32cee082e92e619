"""A bounded, seeded uniform sample of a stream of per-sample rows, gathered across processes.

Each row gets a random key from a seeded generator; the reservoir keeps the ``capacity`` rows with
the smallest keys (a uniform sample without replacement of everything seen, whatever the batch
sizes). Memory: ``capacity`` rows of each column, e.g. ``capacity * (C + 4) * 4`` bytes for float
logits of ``C`` classes and four integer columns. Under DDP each process keeps its own reservoir;
:meth:`SampleReservoir.gathered` concatenates every process's rows on every process (one padded
``all_gather`` per column).

Example:
    >>> import torch
    >>> r = SampleReservoir(capacity=3, seed=0)
    >>> r.add({"x": torch.arange(5.0)})
    >>> r.add({"x": torch.arange(5.0, 10.0)})
    >>> r.seen, len(r), sorted(r.rows()["x"].tolist()) == sorted(set(r.rows()["x"].tolist()))
    (10, 3, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["SampleReservoir", "gather_rows"]


class SampleReservoir:
    """At most ``capacity`` rows (dicts of tensors sharing the leading size), uniformly sampled."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"A reservoir's `capacity` must be a positive integer, got {capacity!r}.")
        self.capacity = capacity
        self.seed = seed
        self.seen = 0
        self._rows: dict[str, Tensor] = {}
        self._keys = torch.empty(0)
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self._keys.numel())

    def reset(self, seed: Optional[int] = None) -> None:
        """Empty the reservoir (and reseed its generator)."""
        self.seen, self._rows, self._keys = 0, {}, torch.empty(0)
        self._generator = torch.Generator().manual_seed(self.seed if seed is None else seed)

    def add(self, rows: Mapping[str, Tensor]) -> None:
        """Offer a batch of rows; keeps the ``capacity`` smallest keys of everything seen."""
        sizes = {int(v.shape[0]) for v in rows.values()}
        if len(sizes) != 1:
            raise ValueError(f"Reservoir rows must share their leading size, got {sorted(sizes)}.")
        n = sizes.pop()
        self.seen += n
        keys = torch.rand(n, generator=self._generator)
        if not self._rows:
            self._rows = {k: v.detach() for k, v in rows.items()}
            self._keys = keys
        else:
            self._rows = {k: torch.cat([self._rows[k], rows[k].detach().to(self._rows[k].device)]) for k in self._rows}
            self._keys = torch.cat([self._keys, keys])
        if len(self._keys) > self.capacity:
            keep = torch.topk(self._keys, self.capacity, largest=False).indices.sort().values
            self._keys = self._keys[keep]
            self._rows = {k: v[keep.to(v.device)] for k, v in self._rows.items()}

    def rows(self) -> dict[str, Tensor]:
        """This process's rows (empty dict when nothing was seen)."""
        return dict(self._rows)

    def gathered(self, strategy: Any, world_size: int, columns: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device) -> dict[str, Tensor]:  # fmt: skip
        """Every process's rows, concatenated in rank order, on every process. ``columns`` gives each
        column's trailing shape and dtype (for a process that saw no rows)."""
        local = {
            name: self._rows.get(name, torch.empty((0, *shape), dtype=dtype))
            for name, (shape, dtype) in columns.items()
        }
        return gather_rows(strategy, world_size, local, device)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "rows": {k: v.cpu() for k, v in self._rows.items()}, "keys": self._keys,
                "generator": self._generator.get_state()}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen = int(state["seen"])
        self._rows = dict(state["rows"])
        self._keys = state["keys"]
        self._generator.set_state(state["generator"])


def gather_rows(strategy: Any, world_size: int, rows: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``rows`` of every process concatenated in rank order (padded ``all_gather``, then trimmed)."""
    rows = {k: v.to(device) for k, v in rows.items()}
    if world_size <= 1:
        return rows
    n = int(next(iter(rows.values())).shape[0]) if rows else 0
    counts = strategy.all_gather(torch.tensor([n], device=device)).reshape(-1).tolist()
    top = max(int(c) for c in counts)
    out: dict[str, Tensor] = {}
    for name, value in rows.items():
        padded = torch.zeros((top, *value.shape[1:]), dtype=value.dtype, device=device)
        padded[:n] = value
        stacked = strategy.all_gather(padded)  # (world, top, ...)
        out[name] = torch.cat([stacked[r, : int(c)] for r, c in enumerate(counts)])
    return out
