"""A deep copy of the module during a DP fit (pruning snapshots, MAC counts, EMA weights) copies
the layers' DP hooks with them, never the fit's DP optimizer."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import TinyData, TinyModule, trainer


class CopyEveryStep(pl.Callback):
    def __init__(self) -> None:
        self.copies: list[torch.nn.Module] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.copies.append(copy.deepcopy(pl_module.net))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_module_deep_copies_during_a_dp_fit(mode: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    copier = CopyEveryStep()
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, grad_sample_mode=mode)
    module = TinyModule(hidden=8)
    trainer(tmp_path, callbacks=[dp, copier], max_steps=3).fit(module, TinyData())
    assert len(copier.copies) == 3 and dp.steps == 3
    x = torch.randn(5, 4)
    last = copier.copies[-1].eval()
    # the copy is a working model (its weights are the module's after the last step)
    assert torch.equal(last(x), module.net.eval()(x))
