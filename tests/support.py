"""The one test support module: a quiet CPU Trainer, a slice of the bundled Adult data, and a
callback that kills a run at a chosen point (for kill-and-resume tests)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Subset


def trainer(tmp_path: Any = None, callbacks: Optional[Sequence[Any]] = None, **kwargs: Any) -> pl.Trainer:
    """A quiet, deterministic single-process CPU Trainer; ``kwargs`` override any default."""
    options: dict[str, Any] = dict(
        default_root_dir=str(tmp_path) if tmp_path is not None else tempfile.mkdtemp(prefix="lt_test_"),
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks or []), **options)


class AdultSubset(pl.LightningDataModule):
    """A slice of the session's Adult datamodule (read-only: its datasets are shared), keeping its
    ``batch_keys``, feature names, categories and group names.

    ``n_train`` rows of the training split (the first ones, or a seeded random choice with
    ``pick="random"``), the first ``n_val``/``n_test`` rows of validation/test (``None``: all).
    """

    def __init__(
        self,
        adult: Any,
        n_train: Optional[int] = 2048,
        n_val: Optional[int] = 512,
        n_test: Optional[int] = None,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        pick: str = "first",
        eval_batch_size: int = 512,
    ) -> None:
        super().__init__()
        for name in ("batch_keys", "feature_names", "categories", "group_names"):
            if hasattr(adult, name):
                setattr(self, name, getattr(adult, name))
        generator = torch.Generator().manual_seed(seed)
        train = adult.train_dataset
        count = len(train) if n_train is None else min(n_train, len(train))
        rows = (
            torch.randperm(len(train), generator=generator)[:count].tolist() if pick == "random" else list(range(count))
        )
        self.train: Dataset = Subset(train, rows)
        self.val: Dataset = _head(adult.val_dataset, n_val)
        self.test: Dataset = _head(getattr(adult, "test_dataset", adult.val_dataset), n_test)
        self.batch_size, self.shuffle, self.seed, self.eval_batch_size = batch_size, shuffle, seed, eval_batch_size

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if self.shuffle else None
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.eval_batch_size)


def _head(dataset: Any, n: Optional[int]) -> Dataset:
    return dataset if n is None else Subset(dataset, list(range(min(n, len(dataset)))))


class Kill(Callback):
    """Raises ``RuntimeError("killed")`` once ``trainer.global_step == at_step`` after a training
    batch, or at the end of epoch ``after_epoch``: a run killed mid-epoch or between epochs."""

    def __init__(self, at_step: Optional[int] = None, after_epoch: Optional[int] = None) -> None:
        if (at_step is None) == (after_epoch is None):
            raise ValueError("Kill needs exactly one of `at_step` and `after_epoch`.")
        self.at_step, self.after_epoch = at_step, after_epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.at_step is not None and trainer.global_step == self.at_step:
            raise RuntimeError("killed")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.after_epoch is not None and trainer.current_epoch == self.after_epoch:
            raise RuntimeError("killed")
