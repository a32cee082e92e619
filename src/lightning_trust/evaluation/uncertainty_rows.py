"""The samples an uncertainty pass keeps: per-sample logits, label, content key, side-column codes
and embedding, split into calibration and evaluation rows, each in a bounded reservoir.

A validation sample calibrates when its content key's coin falls below ``calibration_fraction``
(:func:`~lightning_trust.evaluation.sample_keys.calibrates`): the split is a function of the sample,
not of its process, batch or position, so DDP splits as one process does. Test samples are all
evaluated.

Example:
    >>> import torch
    >>> samples = PassSamples(max_samples=100, seed=0, calibration_fraction=0.5)
    >>> rows = {"logits": torch.randn(8, 3), "target": torch.zeros(8, dtype=torch.long),
    ...         "key": torch.arange(8) * 7_654_321, "codes": torch.zeros(8, 0, dtype=torch.long)}
    >>> samples.add(rows, calibrating=True)
    >>> len(samples.calibration) + len(samples.evaluation)
    8
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_trust.core.batch import BatchContract, BatchKeyError
from lightning_trust.evaluation.domains import DomainIndex
from lightning_trust.evaluation.reservoir import SampleReservoir, gather_rows
from lightning_trust.evaluation.sample_keys import calibrates, sample_keys
from lightning_trust.evaluation.uncertainty_fit import canonical_order
from lightning_trust.fairness.groups import read_codes

__all__ = ["PassSamples", "batch_rows", "row_columns"]

Columns = dict[str, tuple[tuple[int, ...], torch.dtype]]


def row_columns(num_classes: int, code_columns: int, hidden: Optional[int]) -> Columns:
    """Each row column's trailing shape and dtype (for a process that kept no rows)."""
    columns: Columns = {"logits": ((num_classes,), torch.float32), "target": ((), torch.long),
                        "key": ((), torch.long), "codes": ((code_columns,), torch.long)}  # fmt: skip
    if hidden is not None:
        columns["embedding"] = ((hidden,), torch.float32)
    return columns


def batch_rows(contract: BatchContract, batch: Any, logits: Tensor, seed: int, columns: Sequence[str],
               indexes: Sequence[DomainIndex]) -> dict[str, Tensor]:  # fmt: skip
    """A batch's rows: float logits, label, content key and one value index per side column."""
    device, n = logits.device, len(logits)
    target = torch.as_tensor(contract.target(batch), device=device)
    keys = sample_keys(contract.inputs(batch), target, seed).to(device)
    codes = torch.zeros(n, 0, dtype=torch.long, device=device)
    if columns:
        try:
            raw = read_codes(contract, batch, list(columns), device)
        except BatchKeyError as err:
            raise BatchKeyError(f"UncertaintyEvaluation(columns={list(columns)}): {err}") from None
        codes = torch.stack([index(raw[:, j], device) for j, index in enumerate(indexes)], dim=1)
    return {"logits": logits.float(), "target": target, "key": keys, "codes": codes}


class PassSamples:
    """The calibration and evaluation reservoirs of one pass (``max_samples`` rows each)."""

    def __init__(self, max_samples: int, seed: int, calibration_fraction: float) -> None:
        self.seed, self.calibration_fraction = seed, calibration_fraction
        self.calibration = SampleReservoir(max_samples, seed)
        self.evaluation = SampleReservoir(max_samples, seed + 1)

    def reset(self, epoch: int) -> None:
        """Empty both reservoirs for the pass of ``epoch`` (reseeded by it)."""
        self.calibration.reset(self.seed + 7919 * epoch)
        self.evaluation.reset(self.seed + 7919 * epoch + 1)

    def add(self, rows: dict[str, Tensor], calibrating: bool) -> None:
        """Offer a batch's rows; a validation batch (``calibrating``) is split by the key's coin."""
        if not calibrating:
            self.evaluation.add(rows)
            return
        to_cal = calibrates(rows["key"], self.calibration_fraction).to(rows["key"].device)
        self.calibration.add({k: v[to_cal] for k, v in rows.items()})
        self.evaluation.add({k: v[~to_cal] for k, v in rows.items()})

    def shapes(self, trainer: Any, device: torch.device) -> tuple[int, int]:
        """The class count and embedding width (0: none), agreed across processes (one may have no rows)."""
        rows = self.calibration.rows() or self.evaluation.rows()
        local = torch.tensor([rows["logits"].shape[1] if rows else 0,
                              rows["embedding"].shape[1] if "embedding" in rows else 0], device=device)  # fmt: skip
        if trainer.world_size > 1:
            local = trainer.strategy.reduce(local, reduce_op="max")
        classes, hidden = (int(v) for v in local.tolist())
        if classes < 2:
            raise RuntimeError("UncertaintyEvaluation saw no predictions; is the validation dataloader empty?")
        return classes, hidden

    def gathered_calibration(self, trainer: Any, columns: Columns, device: torch.device) -> dict[str, Tensor]:
        """Every process's calibration rows, on every process."""
        return self.calibration.gathered(trainer.strategy, trainer.world_size, columns, device)

    def local_evaluation(self, columns: Columns, device: torch.device) -> dict[str, Tensor]:
        """This process's evaluation rows (empty columns when it kept none), on ``device``."""
        rows = self.evaluation.rows() or {k: torch.empty((0, *s), dtype=d) for k, (s, d) in columns.items()}
        return {k: v.to(device) for k, v in rows.items()}

    def gathered_evaluation(self, trainer: Any, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every process's evaluation rows (``local``: this one's), on every process, in canonical order."""
        device = local["logits"].device
        return canonical_order(gather_rows(trainer.strategy, trainer.world_size, local, device))

    def evaluation_counts(self, trainer: Any, device: torch.device) -> tuple[int, int]:
        """``(seen, kept)`` evaluation samples summed over processes."""
        seen = torch.tensor([self.evaluation.seen, len(self.evaluation)], device=device)
        if trainer.world_size > 1:
            seen = trainer.strategy.reduce(seen, reduce_op="sum")
        seen_n, kept_n = (int(v) for v in seen.tolist())
        return seen_n, kept_n
