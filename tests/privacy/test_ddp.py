import pytest
from opacus.accountants import create_accountant

from tests.ddp_harness import run_ddp


@pytest.mark.slow
@pytest.mark.ddp
def test_dp_under_ddp_accounts_the_global_sample_rate(tmp_path):
    results = run_ddp(
        """
        from lightning.pytorch.callbacks import Callback
        from lightning_trust.privacy import DifferentialPrivacy

        class Sizes(Callback):
            def __init__(self):
                self.sizes = []
                self.sync = []
                self.optimizer = None
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.sizes.append(len(batch["y"]))
                self.optimizer = type(trainer.strategy.optimizers[0]).__name__
            def on_before_backward(self, trainer, pl_module, loss):
                self.sync.append(trainer.strategy.model.require_backward_grad_sync)

        pl.seed_everything(0)
        dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-5, accountant="rdp", max_physical_batch_size=128)
        sizes = Sizes()
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=18, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[dp, sizes])
        model = TabularMLP()
        trainer.fit(model, AdultDataModule(batch_size=256))
        save_result({"steps": dp.steps, "epsilon": dp.epsilon_spent, "sample_rate": dp.sample_rate,
                     "optimizer": sizes.optimizer,
                     "sampler": type(trainer.train_dataloader.batch_sampler.sampler).__name__,
                     "sizes": sizes.sizes, "sync": sizes.sync, "world": dp.world_size, "global_step": trainer.global_step,
                     "param_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
                     "report": dp.report()["expected_batch_size"]})
        """,
        tmp_path,
    )
    r0, r1 = results
    # global sample rate: per-rank batch 256 x 2 ranks over 27,146 rows -> q = 1 / ceil(27146 / 512) = 1 / 54
    assert r0["sample_rate"] == r1["sample_rate"] == pytest.approx(1 / 54)
    assert r0["steps"] == r1["steps"] == 6 and r0["world"] == 2
    # virtual batches: every logical batch (~251 per rank) is 3 physical batches on both ranks, so they step together
    assert r0["global_step"] == r1["global_step"] == 18 and len(r0["sizes"]) == len(r1["sizes"]) == 18
    assert max(r0["sizes"] + r1["sizes"]) <= 128
    reference = create_accountant("rdp")
    for _ in range(6):
        reference.step(noise_multiplier=1.0, sample_rate=1 / 54)
    assert abs(r0["epsilon"] - reference.get_epsilon(delta=1e-5)) < 1e-6
    assert r0["epsilon"] == r1["epsilon"]
    assert r0["sampler"] == "EvenDistributedPoissonSampler"
    assert r0["optimizer"] == r1["optimizer"] == "DistributedDPOptimizer"  # noise on rank 0 only, one all-reduce
    assert r0["report"] == pytest.approx(27146 / 54 / 2)
    # each rank Poisson-samples its own shard (sizes vary around 251), and the noisy sum was all-reduced once
    assert r0["sizes"] != r1["sizes"] and len(set(r0["sizes"])) > 1
    assert r0["param_sum"] == pytest.approx(r1["param_sum"], abs=1e-9)
    assert not any(r0["sync"]) and not any(r1["sync"])  # Lightning's own all-reduce of raw gradients is off


@pytest.mark.slow
@pytest.mark.ddp
def test_ghost_clipping_under_ddp(tmp_path):
    results = run_ddp(
        """
        from lightning_trust.privacy import DifferentialPrivacy

        pl.seed_everything(0)
        dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-5, grad_sample_mode="ghost")
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[dp])
        model = TabularMLP()
        trainer.fit(model, AdultDataModule(batch_size=256))
        save_result({"steps": dp.steps, "param_sum": float(sum(p.detach().double().sum() for p in model.parameters()))})
        """,
        tmp_path,
    )
    assert results[0]["steps"] == results[1]["steps"] == 3
    assert results[0]["param_sum"] == pytest.approx(results[1]["param_sum"], abs=1e-9)
