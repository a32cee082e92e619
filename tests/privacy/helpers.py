"""Tiny models and data for the privacy tests (fast on a shared CPU)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests import support


def tiny_data(n: int = 240, features: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class TinyData(pl.LightningDataModule):
    def __init__(self, n: int = 240, batch_size: int = 24, features: int = 4) -> None:
        super().__init__()
        self.dataset = tiny_data(n, features)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=64)


class TinyModule(pl.LightningModule):
    """A user module that knows nothing of DP: Linear(-ReLU-Linear) with plain SGD."""

    def __init__(self, features: int = 4, hidden: int = 0, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        if hidden:
            self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        else:
            self.net = nn.Sequential(nn.Linear(features, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, batch_size=max(len(y), 1))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y), batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def trainer(tmp_path: Any = None, **kwargs: Any) -> pl.Trainer:
    """The one test Trainer (:func:`tests.support.trainer`) as the privacy tests use it: no validation
    loop unless a test asks for one, and ε logged every 10 noisy steps unless a test says otherwise."""
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("log_every_n_steps", 10)
    return support.trainer(tmp_path, **kwargs)


class BatchRecorder(pl.Callback):
    """Records each training batch and the parameters before/after each step."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(batch)
        self.before.append([p.detach().clone() for p in pl_module.parameters()])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after.append([p.detach().clone() for p in pl_module.parameters()])


def hand_update(model, before, x, y, max_grad_norm, expected_batch_size, per_layer=False):
    """sum_i clip(grad_i) / expected_batch_size, from one autograd call per sample."""
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        if per_layer:
            bound = max_grad_norm / math.sqrt(len(params))
            factors = [min(1.0, bound / (g.norm().item() + 1e-6)) for g in grads]
        else:
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
            factors = [min(1.0, max_grad_norm / (norm + 1e-6))] * len(grads)
        for t, g, f in zip(total, grads, factors):
            t += f * g
    return [t / expected_batch_size for t in total]
