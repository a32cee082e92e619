"""Per-sample clipping: with noise 0 the update is the mean of per-sample clipped gradients, computed by hand."""

import math

import pytest
import torch

from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import BatchRecorder, TinyData, TinyModule, hand_update, trainer


@pytest.mark.parametrize(
    ("mode", "clipping"), [("hooks", "flat"), ("functorch", "flat"), ("ghost", "flat"), ("hooks", "per_layer")]
)
def test_update_is_mean_of_clipped_per_sample_gradients(tmp_path, mode, clipping):
    torch.manual_seed(0)
    model = TinyModule(hidden=5, lr=1.0)
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=0.05, target_delta=1e-3, grad_sample_mode=mode, clipping=clipping
    )
    trainer(tmp_path, max_steps=2, callbacks=[dp, recorder]).fit(model, TinyData(n=240, batch_size=24))
    assert dp.expected_batch_size == pytest.approx(24.0)
    for step in range(2):
        x, y = recorder.batches[step]
        grads = hand_update(TinyModule(hidden=5), recorder.before[step], x, y, 0.05, 24.0, clipping == "per_layer")
        for b, a, g in zip(recorder.before[step], recorder.after[step], grads):
            torch.testing.assert_close(a, b - 1.0 * g, atol=1e-6, rtol=1e-5)
    # the bound really bit: unclipped per-sample gradients are larger than 0.05
    assert math.isinf(dp.epsilon_spent)


def test_ghost_and_hooks_take_the_same_noisy_step(tmp_path):
    results = []
    for mode in ("hooks", "ghost"):
        torch.manual_seed(3)
        model = TinyModule(hidden=8, lr=0.5)
        torch.manual_seed(4)
        dp = DifferentialPrivacy(noise_multiplier=0.7, max_grad_norm=0.3, target_delta=1e-3, grad_sample_mode=mode)
        trainer(tmp_path, max_steps=3, callbacks=[dp]).fit(model, TinyData(n=240, batch_size=24))
        results.append([p.detach().clone() for p in model.parameters()])
    for h, g in zip(*results):
        torch.testing.assert_close(h, g, atol=1e-5, rtol=1e-4)
