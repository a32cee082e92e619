"""FSDP under DP: refused before training with the reason and the fix (Lightning's FSDPStrategy is
FSDP1, whose flattened parameters carry no per-sample gradients; Opacus's FSDP support needs FSDP2
applied by Opacus). On CPU Lightning refuses FSDP itself; a subclass gets past that check, and the
refusal is ours. On CUDA the same refusal (``gpu``-marked)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_trust.privacy.checks import check_trainer
from tests.ddp_harness import run_ddp
from tests.privacy.helpers import TinyData, TinyModule

FIX = r"Use strategy='ddp' with DifferentialPrivacy\(grad_sample_mode='ghost', max_physical_batch_size=\.\.\.\)"


def test_lightning_refuses_fsdp_on_cpu_itself():
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(strategy="fsdp", accelerator="cpu", devices=2)


@pytest.mark.parametrize("strategy", [type("CPUFSDP", (FSDPStrategy,), {}), ModelParallelStrategy])
def test_sharded_strategies_are_refused_with_the_fix(strategy):
    trainer = pl.Trainer(strategy=strategy(), accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match=FIX):
        check_trainer(trainer, "hooks", None)


@pytest.mark.slow
def test_dp_fit_under_fsdp_is_refused_at_setup(tmp_path):
    results = run_ddp(
        """
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_trust.privacy import DifferentialPrivacy

        class Tiny(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(4, 2)
            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.cross_entropy(self.net(x), y)
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
            def train_dataloader(self):
                return DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=8)

        class CPUFSDP(FSDPStrategy):  # Lightning checks `type(strategy) is FSDPStrategy` for its own CPU refusal
            pass

        model = Tiny()
        before = [p.detach().clone() for p in model.parameters()]
        trainer = pl.Trainer(strategy=CPUFSDP(), accelerator="cpu", devices=1, max_steps=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)])
        try:
            trainer.fit(model)
            save_result({"error": None})
        except ValueError as error:
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            save_result({"error": str(error), "steps": trainer.global_step, "unchanged": unchanged})
        """,
        tmp_path,
        world_size=1,
    )
    assert results[0]["error"] is not None and results[0]["steps"] == 0 and results[0]["unchanged"]
    assert "FSDP1 `FullyShardedDataParallel`" in results[0]["error"]
    assert "Use strategy='ddp' with DifferentialPrivacy(grad_sample_mode='ghost'" in results[0]["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Lightning's FSDPStrategy)")
def test_dp_under_fsdp_on_cuda_is_refused_before_training(tmp_path):
    from lightning_trust.privacy import DifferentialPrivacy

    model = TinyModule()
    trainer = pl.Trainer(
        strategy="fsdp", accelerator="cuda", devices=1, max_steps=2, logger=False, default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)],
    )  # fmt: skip
    with pytest.raises(ValueError, match=FIX):
        trainer.fit(model, TinyData())
    assert trainer.global_step == 0
