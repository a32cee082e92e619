"""The sufficient statistics of group fairness: confusion counts per group and class.

Every metric :class:`~lightning_trust.fairness.FairnessMetrics` reports (selection rate, TPR,
FPR, accuracy, precision, ..., and the disparities between groups) is a ratio of confusion
counts within a group, so the state is one integer table ``[groups, classes, classes]`` per
sensitive-feature entry (true class x predicted class), summed over batches and over DDP ranks
(``dist_reduce_fx="sum"``): its size depends on the groups and classes, never on the rows.

Bootstrap intervals come from streaming Poisson-bootstrap replicates: each sample is added to
``n_boot`` replicate tables with an independent Poisson(1) weight (the streaming equivalent of
resampling the rows with replacement), so they too are ``n_boot`` count tables.

Codes outside a column's groups (and, multiclass, labels outside the classes) land in one extra
"invalid" cell, counted without a host sync; :class:`FairnessMetrics` refuses them.

Example:
    >>> import torch
    >>> layout = Layout(("sex", "race"), (2, 3), ((0,), (0, 1)), num_classes=2)
    >>> counts = GroupCounts(layout)
    >>> counts.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0]), torch.tensor([[0, 2], [1, 0], [1, 0]]))
    >>> table, replicates = counts.compute()
    >>> layout.tables(table)[0].tolist()  # sex: [group][true][pred]
    [[[0, 0], [0, 1]], [[0, 1], [1, 0]]]
    >>> layout.invalid(table), replicates is None, state_bytes(counts)
    (0, True, 264)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MAX_STATE_BYTES", "GroupCounts", "Layout", "state_bytes"]

#: The largest count state (tables and replicates) built; beyond it the groups must be named.
MAX_STATE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Layout:
    """Where each (entry, group, true class, predicted class) cell sits in the flat count vector.

    Args:
        columns: the base side columns, in the order of the codes' columns.
        capacities: the number of groups of each column (codes ``0..capacity-1``).
        entries: each entry as indices into ``columns`` (several: an intersection).
        num_classes: the classes of the table (2 for binary predictions).
    """

    columns: tuple[str, ...]
    capacities: tuple[int, ...]
    entries: tuple[tuple[int, ...], ...]
    num_classes: int

    def groups(self, entry: int) -> int:
        """The number of group cells of one entry (the product of its columns' groups)."""
        return math.prod(self.capacities[c] for c in self.entries[entry])

    @property
    def offsets(self) -> list[int]:
        cells, out = self.num_classes**2, [0]
        for e in range(len(self.entries)):
            out.append(out[-1] + self.groups(e) * cells)
        return out

    @property
    def size(self) -> int:
        """Cells of all tables (the invalid cell comes after them)."""
        return self.offsets[-1]

    def unravel(self, entry: int, group: int) -> tuple[int, ...]:
        """The column codes of one group cell of ``entry``."""
        shape = [self.capacities[c] for c in self.entries[entry]]
        return tuple(int(i) for i in np.unravel_index(group, shape))

    def index(self, y_true: Tensor, y_pred: Tensor, codes: Tensor) -> Tensor:
        """``[batch, entries]`` flat cell indices; a sample with an out-of-range code or class goes
        to the invalid cell ``size`` (no host sync)."""
        c = self.num_classes
        caps = torch.tensor(self.capacities, device=codes.device)
        bad_code = (codes < 0) | (codes >= caps)
        bad_class = (y_true < 0) | (y_true >= c) | (y_pred < 0) | (y_pred >= c)
        out = []
        for members, start in zip(self.entries, self.offsets):
            group = torch.zeros_like(y_true)
            for m in members:
                group = group * self.capacities[m] + codes[:, m].clamp(0, self.capacities[m] - 1)
            cell = start + (group * c + y_true.clamp(0, c - 1)) * c + y_pred.clamp(0, c - 1)
            bad = bad_class | bad_code[:, list(members)].any(dim=1)
            out.append(torch.where(bad, torch.full_like(cell, self.size), cell))
        return torch.stack(out, dim=1)

    def tables(self, flat: np.ndarray) -> list[np.ndarray]:
        """Each entry's table ``[..., groups, classes, classes]`` from a flat count vector ``[..., size + 1]``."""
        flat = np.asarray(flat)
        c, offsets = self.num_classes, self.offsets
        return [
            flat[..., offsets[e] : offsets[e + 1]].reshape(*flat.shape[:-1], self.groups(e), c, c)
            for e in range(len(self.entries))
        ]

    def invalid(self, flat: np.ndarray) -> int:
        """How many (sample, entry) pairs had a code or class outside the table."""
        return int(np.asarray(flat)[..., self.size].reshape(-1)[0])

    def state_bytes(self, n_boot: int = 0) -> int:
        return (self.size + 1) * (1 + n_boot) * 8


class GroupCounts(Metric):
    """Confusion counts per (entry, group, true class, predicted class), summed over ranks.

    Args:
        layout: the :class:`Layout` of the tables.
        n_boot: Poisson-bootstrap replicate tables (0: none).
        seed: the replicates' seed; :meth:`reseed` sets it per epoch (offset by rank).
    """

    full_state_update = False
    counts: Tensor
    replicates: Tensor

    def __init__(self, layout: Layout, n_boot: int = 0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if layout.state_bytes(n_boot) > MAX_STATE_BYTES:
            raise ValueError(
                f"The fairness count tables would take {layout.state_bytes(n_boot) / 2**20:.0f} MiB "
                f"({layout.size} cells x {1 + n_boot} tables): name the groups of each column "
                "(`datamodule.categories[column]` or `num_groups={column: N}`), use fewer intersections, or set a "
                "smaller `n_boot`."
            )
        self.layout = layout
        self.n_boot = int(n_boot)
        self.seed = int(seed)
        self._generator: Optional[torch.Generator] = None
        self.add_state("counts", default=torch.zeros(layout.size + 1, dtype=torch.long), dist_reduce_fx="sum")
        if self.n_boot:
            shape = (self.n_boot, layout.size + 1)
            self.add_state("replicates", default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def reseed(self, seed: int) -> None:
        """Restart the replicates' random stream (each rank passes its own seed)."""
        self.seed, self._generator = int(seed), None

    def _weights(self, n: int, device: torch.device) -> Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        rate = torch.ones(self.n_boot, n, device=device)
        return torch.poisson(rate, generator=self._generator).long()

    def update(self, y_true: Tensor, y_pred: Tensor, codes: Tensor) -> None:
        """Add one batch: labels and predictions ``[B]`` (class indices), group codes ``[B, columns]``."""
        y_true, y_pred, codes = y_true.reshape(-1).long(), y_pred.reshape(-1).long(), codes.long()
        index = self.layout.index(y_true, y_pred, codes)  # [B, E]
        flat = index.reshape(-1)
        self.counts.index_add_(0, flat, torch.ones_like(flat))
        if self.n_boot:
            weights = self._weights(index.shape[0], index.device)  # [n_boot, B]
            source = weights[:, :, None].expand(-1, -1, index.shape[1]).reshape(self.n_boot, -1)
            self.replicates.index_add_(1, flat, source)

    def compute(self) -> tuple[Tensor, Optional[Tensor]]:
        """``(counts [size + 1], replicates [n_boot, size + 1] or None)`` over every rank."""
        return self.counts, (self.replicates if self.n_boot else None)


def state_bytes(metric: Metric) -> int:
    """Bytes of every tensor in a torchmetrics state (lists of tensors included)."""
    total = 0
    for value in metric.metric_state.values():
        tensors: Sequence[Tensor] = value if isinstance(value, list) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
