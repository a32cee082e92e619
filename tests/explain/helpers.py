"""Small data and models for fast explain tests (the Trainer and the Adult slice are tests/support.py's)."""

from __future__ import annotations

import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_trust.demo import TabularMLP


class DigitsSubset(pl.LightningDataModule):
    """A slice of the session's digits datamodule (tuple batches, 1x8x8 images in [0, 1])."""

    def __init__(self, digits, n_train=512, n_val=128, batch_size=64):
        super().__init__()
        self.train = Subset(digits.train_dataset, list(range(n_train)))
        self.val = Subset(digits.val_dataset, list(range(n_val)))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(
            self.train, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=128)

    def test_dataloader(self):
        return DataLoader(self.val, batch_size=128)


class Synthetic(pl.LightningDataModule):
    """8 Gaussian features; the label depends on features 0 and 3 only."""

    def __init__(self, n=4096, num_features=8, batch_size=128, seed=0, shuffle=True):
        super().__init__()
        self.shuffle = shuffle
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, num_features, generator=g)
        y = (2.0 * x[:, 0] - 3.0 * x[:, 3] > 0).long()
        self.feature_names = [f"f{i}" for i in range(num_features)]
        self.train = TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4])
        self.val = TensorDataset(x[n * 3 // 4 :], y[n * 3 // 4 :])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=torch.Generator().manual_seed(0) if self.shuffle else None,
        )

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=512)


class Tokens(pl.LightningDataModule):
    """Sequences of 6 token ids; the label is whether token 7 ("good") appears."""

    vocab = ["<pad>", "the", "a", "film", "was", "is", "bad", "good", "plot", "fine"]

    def __init__(self, n=512, length=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, len(self.vocab), (n, length), generator=g)
        y = (ids == 7).any(dim=1).long()
        self.train = TensorDataset(ids[: n // 2], y[: n // 2])
        self.val = TensorDataset(ids[n // 2 :], y[n // 2 :])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=128)


class BagOfEmbeddings(pl.LightningModule):
    def __init__(self, vocab_size=10, dim=8):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, ids):
        return self.classifier(self.embedding(ids).mean(dim=1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class SGDMLP(TabularMLP):
    """User code with plain SGD (no optimizer state), for bit-exact comparisons."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class StubTrainer:
    """What ``Attribution.explain`` reads from a Trainer, for calling it outside ``fit``."""

    callbacks: list = []
    loggers: list = []
    current_epoch = 0
    global_step = 0
    is_global_zero = True
    progress_bar_callback = None
    train_dataloader = None
    val_dataloaders = None
    test_dataloaders = None

    def __init__(self, datamodule, log_dir=None):
        self.datamodule = datamodule
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="lt_explain_")
