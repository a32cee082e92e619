"""ProgressivePruning and DifferentialPrivacy in one fit: hooks follow the pruned layers, ε is Opacus's."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from opacus.accountants import create_accountant

from lightning_trust.compression import ProgressivePruning, QuantizationAwareTraining
from lightning_trust.core.compat import IncompatibleCallbacksError
from lightning_trust.demo import TabularMLP
from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import BatchRecorder, TinyData, TinyModule, hand_update
from tests.support import Kill, trainer


class GradSampleShapes(Callback):
    """Per step: whether each optimizer parameter got a per-sample gradient shaped like itself."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[tuple[int, ...], tuple[int, ...]]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append([(tuple(p.shape), tuple(p.grad_sample.shape[1:])) for p in optimizer.params])


def _reference_epsilon(dp: DifferentialPrivacy) -> float:
    reference = create_accountant(dp.accountant)
    for _ in range(dp.steps):
        reference.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
    return reference.get_epsilon(delta=dp.delta)


@pytest.mark.slow
def test_dp_and_pruning_train_together_on_adult_with_opacus_epsilon(tmp_path, adult):
    pl.seed_everything(0)
    dp = DifferentialPrivacy(target_epsilon=3.0, max_grad_norm=1.0, accountant="rdp")
    pruning = ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=2, measure_latency=False)
    shapes = GradSampleShapes()
    model = TabularMLP()
    dense = sum(p.numel() for p in model.parameters())
    fit = pl.Trainer(
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[dp, pruning, shapes],
    )
    fit.fit(model, adult)

    report = pruning.report()
    assert report["params_after"] == sum(p.numel() for p in model.parameters()) < 0.6 * dense
    assert [s["channel_ratio"] for s in report["steps"]] == pytest.approx([0.4375, 0.5])
    # every noisy step, before and after both pruning steps, clipped per-sample gradients of the current parameters
    assert len(shapes.steps) == dp.steps == fit.global_step
    assert all(param == sample for step in shapes.steps for param, sample in step)
    assert len({step[0][0] for step in shapes.steps}) == 3  # dense, first prune, second prune
    # ε is Opacus's accountant over the noisy steps, and the target was kept
    assert dp.epsilon_spent == pytest.approx(_reference_epsilon(dp), abs=1e-9)
    assert dp.epsilon_spent <= 3.0
    # no training record is kept next to the DP model: the traced example is only shapes
    assert torch.count_nonzero(pruning._example) == 0 and pruning._example.shape[1] == 104
    # hooks are gone after fit and the pruned model still predicts well
    assert not any(hasattr(p, "_forward_counter") or hasattr(p, "grad_sample") for p in model.parameters())
    assert report["accuracy_after"] > 0.8


def test_update_after_pruning_is_the_mean_of_clipped_per_sample_gradients(tmp_path):
    torch.manual_seed(0)
    model = TinyModule(hidden=8, lr=1.0)
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=0.05, target_delta=1e-3)
    pruning = ProgressivePruning(
        pruning_ratio=0.5, schedule="one_shot", start_epoch=1, end_epoch=1, measure_latency=False, evaluate=False
    )
    trainer(
        tmp_path, [dp, pruning, recorder], max_epochs=2, limit_val_batches=0, log_every_n_steps=10, deterministic=False
    ).fit(model, TinyData(n=240, batch_size=24))
    assert model.net[0].weight.shape == (4, 4)
    pruned = copy.deepcopy(model)
    checked = 0
    for before, after, (x, y) in zip(recorder.before, recorder.after, recorder.batches):
        if [b.shape for b in before] != [p.shape for p in model.parameters()] or len(y) == 0:
            continue  # steps before the prune (and the prune step itself, whose `before` is dense)
        grads = hand_update(pruned, before, x, y, 0.05, dp.expected_batch_size)
        for b, a, g in zip(before, after, grads):
            torch.testing.assert_close(a, b - g, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked >= 5


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_same_epsilon_and_shapes(tmp_path):
    def callbacks():
        return [
            DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp"),
            ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=3, measure_latency=False, evaluate=False),
        ]

    def run(folder, extra=(), ckpt_path=None):
        torch.manual_seed(0)
        model, cbs = TinyModule(hidden=16), callbacks()
        saver = ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, filename="{epoch}")
        fit = trainer(
            tmp_path / folder,
            [*cbs, saver, *extra],
            max_epochs=5,
            enable_checkpointing=True,
            limit_val_batches=0,
            log_every_n_steps=10,
            deterministic=False,
        )
        fit.fit(model, TinyData(), ckpt_path=ckpt_path)
        return model, cbs

    full, (full_dp, full_pruning) = run("full")
    with pytest.raises(RuntimeError, match="killed"):
        run("killed", extra=[Kill(after_epoch=2)])
    resumed, (resumed_dp, resumed_pruning) = run("resumed", ckpt_path=tmp_path / "killed" / "epoch=1.ckpt")

    assert resumed_dp.steps == full_dp.steps == 50
    assert resumed_dp.epsilon_spent == pytest.approx(full_dp.epsilon_spent, abs=1e-9) and full_dp.epsilon_spent <= 2.0
    assert {n: p.shape for n, p in resumed.named_parameters()} == {n: p.shape for n, p in full.named_parameters()}
    assert resumed.net[0].weight.shape == (8, 4)
    # the step before the kill came from the checkpoint
    assert resumed_pruning._history[:1] == full_pruning._history[:1]


def test_sparsity_regularization_is_refused_under_dp(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    pruning = ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=1, sparsity_regularization=1e-4)
    model = TinyModule(hidden=8)
    before = [p.shape for p in model.parameters()]
    with pytest.raises(
        IncompatibleCallbacksError, match="regularizer's gradient would be silently dropped.*sparsity_regularization: 0"
    ):
        trainer(
            tmp_path, [dp, pruning], max_epochs=2, limit_val_batches=0, log_every_n_steps=10, deterministic=False
        ).fit(model, TinyData())
    assert [p.shape for p in model.parameters()] == before


def test_quantization_aware_training_is_refused_under_dp(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    qat = QuantizationAwareTraining(start_epoch=1)
    with pytest.raises(
        IncompatibleCallbacksError,
        match="QuantizationAwareTraining cannot train in the same fit as DifferentialPrivacy.*"
        "the fake-quantized graph runs instead of the layers where Opacus computes per-sample gradients",
    ):
        trainer(tmp_path, [dp, qat], max_epochs=2, limit_val_batches=0, log_every_n_steps=10, deterministic=False).fit(
            TinyModule(hidden=8), TinyData()
        )


@pytest.mark.slow
@pytest.mark.ddp
def test_dp_and_pruning_under_ddp_on_two_cpu_processes(tmp_path):
    from tests.ddp_harness import run_ddp

    results = run_ddp(
        """
        from lightning_trust.compression import ProgressivePruning
        from lightning_trust.privacy import DifferentialPrivacy

        class Optimizer(pl.Callback):
            def on_train_end(self, trainer, pl_module):
                self.name = type(trainer.strategy.optimizers[0]).__name__

        seen = Optimizer()
        pl.seed_everything(0)
        dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-5, accountant="rdp")
        pruning = ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=1, schedule="one_shot",
                                     measure_latency=False)
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[dp, pruning, seen])
        model = TabularMLP()
        trainer.fit(model, AdultDataModule(batch_size=512))
        save_result({"shapes": {n: list(p.shape) for n, p in model.named_parameters()},
                     "sum": float(sum(p.detach().double().sum() for p in model.parameters())),
                     "steps": dp.steps, "epsilon": dp.epsilon_spent, "sample_rate": dp.sample_rate,
                     "optimizer": seen.name,
                     "acc": pruning.report()["accuracy_after"]})
        """,
        tmp_path,
    )
    r0, r1 = results
    assert r0["shapes"] == r1["shapes"] and r0["shapes"]["features.0.weight"] == [32, 104]
    assert r0["sum"] == pytest.approx(r1["sum"], abs=1e-9)  # one noisy all-reduce per step kept the ranks equal
    assert r0["optimizer"] == "DistributedDPOptimizer"
    assert r0["steps"] == r1["steps"] == 2 * 27  # q = 1 / ceil(27146 / 1024)
    reference = create_accountant("rdp")
    for _ in range(r0["steps"]):
        reference.step(noise_multiplier=1.0, sample_rate=r0["sample_rate"])
    assert r0["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), abs=1e-9)
    assert r0["acc"] == pytest.approx(r1["acc"]) and r0["acc"] > 0.75


class _ReplaceWithoutOptimizer(Callback):
    """A structural change done badly: a new parameter object, the optimizer left pointing at the old one."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            layer = pl_module.net[0]
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone())


def test_a_stale_parameter_in_the_dp_optimizer_is_refused_not_skipped(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    with pytest.raises(
        RuntimeError, match="DP optimizer still holds 1 of the old ones.*param_groups at the new parameters"
    ):
        trainer(
            tmp_path,
            [dp, _ReplaceWithoutOptimizer()],
            max_steps=5,
            limit_val_batches=0,
            log_every_n_steps=10,
            deterministic=False,
        ).fit(TinyModule(hidden=8), TinyData())
    assert dp.steps == 2  # no noisy step ran on the inconsistent model
