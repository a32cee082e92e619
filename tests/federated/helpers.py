"""Small Adult subsets for fast federated tests."""

from __future__ import annotations

import tempfile

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from lightning_trust.demo import TabularMLP


class AdultSubset(pl.LightningDataModule):
    batch_keys = {"input": "x", "target": "y"}

    def __init__(self, adult, n_train=2048, n_val=512, batch_size=64, shuffle=True, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.train = Subset(adult.train_dataset, torch.randperm(len(adult.train_dataset), generator=g)[:n_train].tolist())
        self.val = Subset(adult.val_dataset, list(range(n_val)))
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=self.shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if self.shuffle else None)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=512)


class PlainSGDMLP(TabularMLP):
    """User code with a stateless optimizer (plain SGD)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(default_root_dir=tempfile.mkdtemp(prefix="lt_federated_"), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
