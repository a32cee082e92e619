"""grad_sample_mode='auto': one backward (bk) when every trainable layer has a book-keeping rule or
an Opacus grad sampler and the configuration allows it, else hooks; the choice is logged once and
reported as ``grad_sample_mode_used``, and the run trains as the chosen mode does."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.privacy.bookkeeping import choose_mode, unsupported_layers
from tests.foundation.models import build
from tests.privacy.helpers import TinyData, TinyModule, trainer
from tests.privacy.test_bookkeeping import Scale


class WithCustomLayer(TinyModule):
    """TinyModule with a layer that has neither a book-keeping rule nor an Opacus grad sampler."""

    def __init__(self) -> None:
        super().__init__(hidden=4)
        self.net = nn.Sequential(nn.Linear(4, 4), Scale(4), nn.Linear(4, 2))


def test_choose_mode_rules():
    assert choose_mode("ghost", TinyModule()) == ("ghost", "requested")
    assert choose_mode("auto", TinyModule())[0] == "bk"
    mode, why = choose_mode("auto", TinyModule(), clipping="per_layer")
    assert mode == "hooks" and "per_layer" in why
    mode, why = choose_mode("auto", TinyModule(), accumulate=4)
    assert mode == "hooks" and "accumulate_grad_batches=4" in why
    mode, why = choose_mode("auto", WithCustomLayer())
    assert mode == "hooks" and "net.1 (Scale)" in why
    assert unsupported_layers(WithCustomLayer()) == ["net.1 (Scale)"]


@pytest.mark.parametrize("name", ["bert", "gpt2_lm", "vit"])
def test_matrix_models_have_a_rule_for_every_layer(name):
    module, _ = build(name)
    if name == "vit":  # ViT's embeddings hold the CLS token and position embeddings itself: functorch
        assert unsupported_layers(module) == ["model.vit.embeddings (ViTEmbeddings)"]
        assert choose_mode("auto", module)[0] == "hooks"
    else:
        assert unsupported_layers(module) == [] and choose_mode("auto", module)[0] == "bk"


def test_auto_picks_bk_logs_it_once_and_reports_it(tmp_path, caplog):
    torch.manual_seed(0)
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.5, target_delta=1e-3, grad_sample_mode="auto")
    counted = []
    model = TinyModule(hidden=4)
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counted.append(1)
        original(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO):
            t = trainer(tmp_path, max_steps=3, callbacks=[dp])
            t.fit(model, TinyData())
            trainer(tmp_path, max_steps=6, callbacks=[dp]).fit(model, TinyData(), ckpt_path=None)
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]
    chosen = [r.getMessage() for r in caplog.records if "grad_sample_mode='auto' uses" in r.getMessage()]
    assert chosen == ["DifferentialPrivacy: grad_sample_mode='auto' uses 'bk': " + choose_mode("auto", model)[1] + "."]
    report = dp.report()
    assert report["grad_sample_mode"] == "auto" and report["grad_sample_mode_used"] == "bk"
    assert len(counted) == dp.steps  # one backward per step
    assert type(t.strategy.optimizers[0]).__name__ != "ClippedSumOptimizer"  # the user's optimizer back after fit


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "make", "expected"),
    [
        ({"clipping": "per_layer"}, {}, TinyModule, "hooks"),
        ({}, {"accumulate_grad_batches": 2}, TinyModule, "hooks"),
        ({}, {}, WithCustomLayer, "hooks"),
    ],
)
def test_auto_falls_back_to_hooks_and_trains(tmp_path, kwargs, trainer_kwargs, make, expected):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, grad_sample_mode="auto", **kwargs)
    model = make()
    before = [p.detach().clone() for p in model.parameters()]
    trainer(tmp_path, max_steps=2, callbacks=[dp], **trainer_kwargs).fit(model, TinyData())
    assert dp.grad_sample_mode_used == expected and dp.report()["grad_sample_mode_used"] == expected
    assert dp.steps == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
