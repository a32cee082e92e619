"""Synthetic data with known logits and group codes, and a module that outputs them."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_trust.demo.data import DictDataset

CATEGORIES = {"sex": ["Female", "Male"], "race": ["A", "B", "C"]}


def synthetic(
    n: int = 517, classes: int = 2, seed: int = 0, rare_positive_race: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """``x`` holds the logits (groups shift class 1), ``y`` labels, ``sex``/``race`` integer codes."""
    g = torch.Generator().manual_seed(seed)
    sex = torch.randint(0, 2, (n,), generator=g)
    race = torch.randint(0, 3, (n,), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    if rare_positive_race is not None:
        y[race == rare_positive_race] = 0  # a group with no positives
    x = torch.randn(n, classes, generator=g) + 1.5 * F.one_hot(y, classes).float()
    x[:, 1] += 0.6 * sex.float() - 0.3 * race.float()
    return {"x": x, "y": y, "sex": sex, "race": race}


class LogitModule(pl.LightningModule):
    """forward(x) = scale * x: predictions are the stored logits (scale starts at 1)."""

    def __init__(self, return_logits: bool = False, direct_forward: bool = False) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.return_logits = return_logits
        self.direct_forward = direct_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self.forward(batch["x"]) if self.direct_forward else self(batch["x"])
        return F.cross_entropy(logits, batch["y"])

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        if self.return_logits:
            return {"logits": self(batch["x"])}
        return None

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SyntheticDataModule(pl.LightningDataModule):
    categories = CATEGORIES

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int = 64) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(DictDataset(self.data), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


def binary_arrays(data: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    scores = torch.softmax(data["x"].float(), dim=1)[:, 1]
    return (data["y"] == 1).long().numpy(), (scores >= 0.5).long().numpy()


def names(data: dict[str, torch.Tensor], column: str) -> np.ndarray:
    return np.array(CATEGORIES[column], dtype=object)[data[column].numpy()]
