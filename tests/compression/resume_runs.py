"""Kill-and-resume runs for the compression tests: a deterministic matrix model (no dropout, no
reshuffle, so a resumed run sees what the uninterrupted one saw), checkpointed every epoch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from tests.foundation.models import build
from tests.support import Kill
from tests.support import trainer as make_trainer


def deterministic(module: nn.Module, dm: Any) -> None:
    """No dropout (HF attention's ``dropout_prob`` too) and an unshuffled training loader."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    dm.train_dataloader = lambda: DataLoader(dm.train, batch_size=dm.batch_size)


def run(root: Path, folder: str, callback: Callable[[], Any], kill: Optional[int] = None,
        ckpt_path: Optional[Path] = None, model: str = "bert") -> tuple[nn.Module, Any]:  # fmt: skip
    """Fit 3 epochs of ``model`` with ``callback()``, checkpointing ``root/folder/epoch=N.ckpt``;
    ``kill``: killed at the end of that epoch; ``ckpt_path``: resumed from it."""
    module, dm = build(model)
    deterministic(module, dm)
    cb = callback()
    saver = ModelCheckpoint(dirpath=root / folder, save_top_k=-1, filename="{epoch}")
    callbacks = [cb, saver] + ([Kill(after_epoch=kill)] if kill is not None else [])
    trainer = make_trainer(root / folder, callbacks, max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                           enable_checkpointing=True)  # fmt: skip
    if kill is not None:
        with pytest.raises(RuntimeError, match="killed"):
            trainer.fit(module, dm)
    else:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module, cb
