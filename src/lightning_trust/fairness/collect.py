"""What :class:`~lightning_trust.fairness.FairnessMetrics` does per batch: read the step's
predictions, labels and group codes, check them once (before any optimizer step), and add them
to the per-group count tables (:class:`~lightning_trust.fairness.counts.GroupCounts`).

The groups of a column are ``datamodule.categories[column]`` when named, else ``num_groups[column]``,
else :data:`DEFAULT_GROUPS` (codes ``0..N-1``; a code outside them is refused). The number of
classes is read from the first predictions.

Example:
    >>> collector = CountCollector([["sex"], ["sex", "race"]], num_groups={"race": 5})
    >>> collector.columns, collector.capacity("race", None), collector.capacity("sex", ["F", "M"])
    (['sex', 'race'], 5, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
from torch import Tensor

from lightning_trust.core.batch import BatchContract, batch_size_of
from lightning_trust.core.capture import ForwardCapture, step_predictions
from lightning_trust.fairness.checks import check_batch, check_predictions, predictions_of, probe_batch
from lightning_trust.fairness.counts import GroupCounts, Layout, state_bytes
from lightning_trust.fairness.groups import base_columns, group_names, read_codes
from lightning_trust.fairness.predictions import hard_predictions
from lightning_trust.fairness.tables import fairness_results

__all__ = ["DEFAULT_GROUPS", "CountCollector"]

#: Groups of a column whose groups are not named (codes 0..31).
DEFAULT_GROUPS = 32


class CountCollector:
    """Streams batches into count tables for the sensitive-feature ``entries``.

    Args:
        entries: the entries (lists of side columns; several: an intersection).
        num_groups: groups of columns the datamodule does not name.
        n_boot: Poisson-bootstrap replicate tables (0: none).
        who: the callback's name in refusals.
    """

    def __init__(
        self,
        entries: list[list[str]],
        num_groups: Optional[Mapping[str, int]] = None,
        n_boot: int = 0,
        activation: str = "auto",
        positive_label: int = 1,
        threshold: float = 0.5,
        who: str = "FairnessMetrics",
    ) -> None:
        self.entries = entries
        self.columns = base_columns(entries)
        self.num_groups = dict(num_groups or {})
        self.n_boot = n_boot
        self.activation, self.positive_label, self.threshold = activation, positive_label, threshold
        self.who = who
        self.contract: Optional[BatchContract] = None
        self.names: dict[str, Optional[list[str]]] = {}
        self.capacities: list[int] = []
        self.counts: Optional[GroupCounts] = None
        self.checked = False
        self._capture = ForwardCapture()
        self._seed = 0

    def capacity(self, column: str, names: Optional[list[str]]) -> int:
        """The groups of ``column``: its names, else ``num_groups``, else :data:`DEFAULT_GROUPS`."""
        return len(names) if names else int(self.num_groups.get(column, DEFAULT_GROUPS))

    def setup(self, trainer: pl.Trainer, batch_keys: Optional[dict[str, Any]]) -> None:
        """Resolve the batch contract and the groups; the next batch is checked again."""
        self.contract = BatchContract.resolve(batch_keys, trainer, side_keys=self.columns)
        self.names = {c: group_names(trainer, c) for c in self.columns}
        capacities = [self.capacity(c, self.names[c]) for c in self.columns]
        if capacities != self.capacities:
            self.counts = None
        self.capacities = capacities
        self.checked = False

    # checks -------------------------------------------------------------------------------------
    def check(self, batch: Any, preds: Tensor) -> None:
        """Refuse a batch without the columns or target, non-integer or out-of-range codes, or
        predictions that are not one per sample (once per setup)."""
        assert self.contract is not None
        check_batch(self.contract, batch, self.columns, self.capacities, self.who)
        check_predictions(preds, self.contract.target(batch), self.who)
        self.checked = True

    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check one validation batch now (the start of training) when no sanity pass did."""
        if self.checked or self.contract is None:
            return
        batch = probe_batch(trainer, pl_module)
        if batch is not None:
            check_batch(self.contract, batch, self.columns, self.capacities, self.who)
            self.check(batch, predictions_of(trainer, pl_module, self.contract, batch))

    # batches ------------------------------------------------------------------------------------
    def start(self, pl_module: pl.LightningModule, seed: int) -> None:
        """Empty the tables for a new epoch; the replicates restart from ``seed``."""
        self._seed = seed
        if self.counts is not None:
            self.counts.reset()
            self.counts.to(pl_module.device)
            self.counts.reseed(seed)

    def arm(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Listen to the step's forward (its output is reused, no extra forward)."""
        assert self.contract is not None
        self._capture.arm(pl_module, batch_size_of(batch, self.contract))

    def predictions(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> Tensor:
        assert self.contract is not None
        return step_predictions(self._capture, self.contract, pl_module, batch, outputs, pl_module.trainer)

    def update(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        """Add one batch to the tables (checked first when it is the first one)."""
        assert self.contract is not None
        preds = self.predictions(pl_module, outputs, batch)
        if not self.checked:
            self.check(batch, preds)
        y_true, y_pred, num_classes = hard_predictions(
            preds, self.contract.target(batch), self.activation, self.positive_label, self.threshold
        )
        counts = self._counts(num_classes, pl_module)
        counts.update(y_true, y_pred, read_codes(self.contract, batch, self.columns, y_pred.device))

    def _counts(self, num_classes: int, pl_module: pl.LightningModule) -> GroupCounts:
        if self.counts is None or self.counts.layout.num_classes != num_classes:
            index = {c: i for i, c in enumerate(self.columns)}
            entries = tuple(tuple(index[c] for c in e) for e in self.entries)
            layout = Layout(tuple(self.columns), tuple(self.capacities), entries, num_classes)
            self.counts = GroupCounts(layout, n_boot=self.n_boot, seed=self._seed).to(pl_module.device)
        return self.counts

    def results(
        self, metrics: list[str], intervals: bool, ci_quantiles: list[float], min_group_size: int
    ) -> dict[str, Any]:
        """The tables summed over ranks, read out (:func:`~lightning_trust.fairness.tables.fairness_results`)."""
        assert self.counts is not None
        counts, replicates = self.counts.compute()
        flat = counts.cpu().numpy()
        invalid = self.counts.layout.invalid(flat)
        if invalid:
            raise ValueError(
                f"{self.who}: {invalid} (sample, feature) pair(s) this epoch had a group code outside the groups of "
                f"{dict(zip(self.columns, self.capacities))} or a label outside the classes. Name every group in "
                "`datamodule.categories[column]` or pass `num_groups={column: N}`."
            )
        reps = replicates.cpu().numpy() if intervals and replicates is not None else None
        results = fairness_results(
            flat, reps, self.counts.layout, self.names, metrics, ci_quantiles=ci_quantiles,
            min_group_size=min_group_size,
        )  # fmt: skip
        results["state_bytes"] = self.state_bytes()
        return results

    def state_bytes(self) -> int:
        """Bytes of the count tables (0 before the first batch)."""
        return state_bytes(self.counts) if self.counts is not None else 0
