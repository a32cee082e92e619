"""Extra forward/backward passes by other callbacks leave no trace in per-sample gradients or ε."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_trust.core import isolated_eval
from lightning_trust.core.protocol import Pausable
from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import TinyData, TinyModule, trainer


class ExtraPasses(Callback):
    """Runs attribution-like and adversarial-like passes between backward and the optimizer step."""

    def __init__(self, dp):
        self.dp = dp
        self.checked = 0

    def on_after_backward(self, trainer, pl_module):
        params = list(pl_module.parameters())
        before = [p.grad_sample.clone() for p in params]
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))  # not the global RNG (the noise uses it)
        # attribution style: eval mode, grads on, through the shared helper (pauses DP)
        with isolated_eval(pl_module, trainer, grad=True) as m:
            inputs = x.clone().requires_grad_(True)
            torch.autograd.grad(m(inputs)[:, 1].sum(), inputs)
            m(x).sum().backward()
        # adversarial/fairness style: train mode forward + backward inside the pause
        with self.dp.paused():
            saved = [p.grad for p in params]
            pl_module(x).logsumexp(1).mean().backward()
            for p, g in zip(params, saved):
                p.grad = g
        # eval mode with grads on and no pause must not crash the hooks either
        pl_module.eval()
        with torch.enable_grad():
            inputs = x.clone().requires_grad_(True)
            torch.autograd.grad(pl_module(inputs).sum(), inputs)
        pl_module.train()
        for p, b in zip(params, before):
            assert torch.equal(p.grad_sample, b)
        self.checked += 1


def _run(tmp_path, extra: bool):
    torch.manual_seed(0)
    model = TinyModule()
    torch.manual_seed(1)
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5, target_delta=1e-3)
    callbacks = [dp] + ([ExtraPasses(dp)] if extra else [])
    trainer(tmp_path, max_steps=6, callbacks=callbacks).fit(model, TinyData())
    return dp, callbacks, [p.detach() for p in model.parameters()]


@pytest.mark.slow
def test_paused_passes_leave_training_unchanged(tmp_path):
    assert isinstance(DifferentialPrivacy(noise_multiplier=1.0), Pausable)
    dp_plain, _, plain = _run(tmp_path, extra=False)
    dp_extra, callbacks, extra = _run(tmp_path, extra=True)
    assert callbacks[1].checked == 6
    assert dp_extra.steps == dp_plain.steps == 6 and dp_extra.epsilon_spent == dp_plain.epsilon_spent
    for a, b in zip(plain, extra):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_validation_forward_under_no_grad_works_and_hooks_are_removed_after_fit(tmp_path):
    model = TinyModule()
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=None, num_sanity_val_steps=2, callbacks=[dp])
    t.fit(model, TinyData())
    assert "val/loss" in t.callback_metrics
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    with dp.paused():  # a no-op once fit is over
        model(torch.randn(2, 4)).sum().backward()
