"""grad_sample_mode='bk' (book-keeping: one backward pass): per-sample norms and clipped sums equal
Opacus's hooks-mode per-sample clipping on a raw model of every supported layer kind (and a layer
with no rule, through functorch), the DP step equals hooks mode on every matrix model (noise 0, to
1e-6), the noisy step and ε equal hooks mode, and pause, physical batches and refusals behave."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch import nn

from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.privacy.bookkeeping import BookKeeping
from tests.foundation.models import MODELS, build
from tests.privacy.helpers import BatchRecorder, TinyData, TinyModule, hand_update, trainer


class Scale(nn.Module):
    """A layer with no book-keeping rule and no Opacus grad sampler (functorch computes it)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class Mixed(nn.Module):
    """Embedding, Conv1d, Conv2d, LayerNorm, a functorch layer, a Linear used twice and a head tied
    to the embedding (one weight, two layers)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1, stride=2)
        self.ln = nn.LayerNorm(6)
        self.scale = Scale(6)
        self.lin = nn.Linear(6, 6)
        self.tied = nn.Linear(6, 20, bias=False)
        self.tied.weight = self.emb.weight
        self.head = nn.Linear(20 + 2 * 4, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        h = self.act(self.lin(self.ln(h)))  # in place on a Linear's (3-d, view) output with inplace=True
        h = self.lin(self.scale(h))
        return self.head(torch.cat([self.tied(h).mean(1), self.conv2(img).flatten(1)], 1))


def _batch(n: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (n, 5), generator=g), torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,))


def _opacus_clipped(model: nn.Module, clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Opacus's hooks-mode per-sample gradients, clipped and summed as its DPOptimizer does."""
    ids, img, y = _batch()
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    F.cross_entropy(model(ids, img), y).backward()
    samples = [p.grad_sample for p in model.parameters()]
    hooks.cleanup()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples]).norm(dim=0)
    coeff = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", coeff, g) for g in samples], norms


def _bk_clipped(model: nn.Module, clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    ids, img, y = _batch()
    bk = BookKeeping(clip)
    bk.attach(model)
    seen: list[nn.Parameter] = []
    for p in model.parameters():  # fires if autograd computes a parameter gradient: bk must compute none
        p.register_hook(lambda g, p=p: seen.append(p))
    F.cross_entropy(model(ids, img), y).backward()
    assert not seen
    bk.finish()
    grads = [p.grad.clone() for p in model.parameters()]
    assert bk.per_sample_norms is not None
    norms = bk.per_sample_norms
    bk.detach()
    return grads, norms


@pytest.mark.parametrize("inplace", [False, True])
def test_raw_model_matches_opacus_hooks_per_sample_clipping(inplace):
    torch.manual_seed(0)
    reference = Mixed()
    expected, expected_norms = _opacus_clipped(reference, clip=2.2)
    torch.manual_seed(0)
    model = Mixed(inplace=inplace)  # Opacus's own hooks refuse an in-place op on a hooked output
    grads, norms = _bk_clipped(model, clip=2.2)
    assert (expected_norms > 2.2).any() and (expected_norms < 2.2).any()  # some samples clipped, some not
    torch.testing.assert_close(norms, expected_norms, atol=1e-5, rtol=1e-6)
    for name, (g, e) in zip([n for n, _ in model.named_parameters()], zip(grads, expected)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=name)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_broadcast_batch_is_refused_naming_the_layer():
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(10, 4), nn.Embedding(6, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])

    model, bk = Positions(), BookKeeping(1.0)
    bk.attach(model)
    with pytest.raises(ValueError, match=r"layer pos \(Embedding\) has batch size \[1\], the batch has 3"):
        bk.backward(model(torch.randint(0, 10, (3, 5))).sum())
    bk.detach()


def test_parameter_used_outside_its_layer_is_refused():
    class Shortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + F.linear(x, self.lin.weight)  # the weight applied outside self.lin

    model, bk = Shortcut(), BookKeeping(1.0)
    bk.attach(model)
    with pytest.raises(RuntimeError, match=r"parameters lin\.weight got a gradient outside"):
        bk.backward(model(torch.randn(4, 3)).sum())
    bk.detach()


# ---------------------------------------------------------------------------------- the callback
class Grads(pl.Callback):
    """The DP optimizer's gradient of the first step (noised and averaged: ``p.grad`` after it)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def _first_step(tmp_path: Any, name: str, mode: str) -> tuple[dict[str, torch.Tensor], DifferentialPrivacy]:
    module, datamodule = build(name)
    for layer in module.modules():  # the same model in both modes, whatever the RNG
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    grads = Grads()
    dp = DifferentialPrivacy(
        noise_multiplier=0.0,
        max_grad_norm=0.01,
        target_delta=1e-3,
        grad_sample_mode=mode,
        fix_module=name == "demo_transformer",
    )
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=1, callbacks=[dp, grads]).fit(module, datamodule)
    return grads.grads, dp


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_matrix_model_bk_step_equals_hooks(tmp_path, name):
    expected, _ = _first_step(tmp_path, name, "hooks")
    backward_calls = []
    original = torch.Tensor.backward

    def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        backward_calls.append(1)
        original(self, *args, **kwargs)

    torch.Tensor.backward = counted  # type: ignore[method-assign]
    try:
        grads, dp = _first_step(tmp_path, name, "bk")
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]
    assert dp.grad_sample_mode_used == "bk" and dp.steps == 1
    assert len(backward_calls) == 1  # one backward pass per step
    assert grads.keys() == expected.keys() and expected
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0
    for key in expected:
        torch.testing.assert_close(grads[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


def test_noisy_steps_and_epsilon_equal_hooks(tmp_path):
    results = []
    for mode in ("hooks", "bk"):
        torch.manual_seed(3)
        model = TinyModule(hidden=8, lr=0.5)
        torch.manual_seed(4)
        dp = DifferentialPrivacy(noise_multiplier=0.7, max_grad_norm=0.3, target_delta=1e-3, grad_sample_mode=mode)
        trainer(tmp_path, max_steps=3, callbacks=[dp]).fit(model, TinyData(n=240, batch_size=24))
        results.append(([p.detach().clone() for p in model.parameters()], dp.steps, dp.epsilon_spent, dp.report()))
    (hooks, steps_h, eps_h, _), (bk, steps_b, eps_b, report) = results
    for h, b in zip(hooks, bk):
        torch.testing.assert_close(b, h, atol=1e-6, rtol=1e-5)
    assert steps_h == steps_b == 3 and eps_b == eps_h and 0 < eps_b < float("inf")
    assert report["grad_sample_mode"] == report["grad_sample_mode_used"] == "bk"


def test_update_is_mean_of_clipped_per_sample_gradients_with_physical_batches(tmp_path):
    torch.manual_seed(0)
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=0.05, target_delta=1e-3, max_physical_batch_size=9, grad_sample_mode="bk"
    )
    t = trainer(tmp_path, max_steps=10, callbacks=[dp, recorder])
    t.fit(TinyModule(hidden=5, lr=1.0), TinyData(n=240, batch_size=24))
    assert dp.steps == 2 and t.global_step == 10  # 5 physical batches per logical batch
    x = torch.cat([b[0] for b in recorder.batches[:5]])
    y = torch.cat([b[1] for b in recorder.batches[:5]])
    grads = hand_update(TinyModule(hidden=5), recorder.before[0], x, y, 0.05, 24.0)
    for b, a, g in zip(recorder.before[0], recorder.after[4], grads):
        torch.testing.assert_close(a, b - g, atol=1e-6, rtol=1e-5)


class ExtraPass(pl.Callback):
    """A paused forward/backward between the backward and the optimizer step (an attribution run)."""

    def __init__(self, dp: DifferentialPrivacy) -> None:
        self.dp = dp

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        with self.dp.paused():
            pl_module(torch.randn(5, 4)).sum().backward()


@pytest.mark.parametrize("extra", [False, True])
def test_paused_passes_leave_no_trace(tmp_path, extra):
    torch.manual_seed(0)
    model, recorder = TinyModule(hidden=5, lr=1.0), BatchRecorder()
    dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=0.05, target_delta=1e-3, grad_sample_mode="bk")
    callbacks = [dp, recorder] + ([ExtraPass(dp)] if extra else [])
    trainer(tmp_path, max_steps=2, callbacks=callbacks).fit(model, TinyData(n=240, batch_size=24))
    for step in range(2):
        x, y = recorder.batches[step]
        grads = hand_update(TinyModule(hidden=5), recorder.before[step], x, y, 0.05, 24.0)
        for b, a, g in zip(recorder.before[step], recorder.after[step], grads):
            torch.testing.assert_close(a, b - g, atol=1e-6, rtol=1e-5)
    assert all(p.requires_grad and not hasattr(p, "grad_sample") for p in model.parameters())
    assert "backward" not in vars(model)  # detached after fit


def test_per_layer_clipping_is_refused():
    with pytest.raises(ValueError, match=r"grad_sample_mode='bk'.*only `clipping='flat'`"):
        DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="bk", clipping="per_layer")


def test_gradient_accumulation_is_refused_before_training(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, grad_sample_mode="bk")
    model = TinyModule()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"grad_sample_mode='bk'.*accumulate_grad_batches=2"):
        trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[dp]).fit(model, TinyData())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
@pytest.mark.ddp
def test_bk_under_ddp(tmp_path):
    from tests.ddp_harness import run_ddp

    results = run_ddp(
        """
        from lightning.pytorch.callbacks import Callback
        from lightning_trust.privacy import DifferentialPrivacy

        class Seen(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.optimizer = type(trainer.strategy.optimizers[0]).__name__

        pl.seed_everything(0)
        dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-5, grad_sample_mode="bk")
        seen = Seen()
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[dp, seen])
        model = TabularMLP()
        trainer.fit(model, AdultDataModule(batch_size=256))
        save_result({"steps": dp.steps, "optimizer": seen.optimizer,
                     "param_sum": float(sum(p.detach().double().sum() for p in model.parameters()))})
        """,
        tmp_path,
    )
    assert results[0]["steps"] == results[1]["steps"] == 3
    assert results[0]["optimizer"] == results[1]["optimizer"] == "DistributedClippedSumOptimizer"
    assert results[0]["param_sum"] == pytest.approx(results[1]["param_sum"], abs=1e-9)  # one noisy sum, all-reduced
