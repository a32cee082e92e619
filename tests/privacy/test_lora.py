"""DP on a PEFT LoRA model (tests/foundation/models.py's ``bert_lora``): only the trainable
parameters are clipped and noised, the frozen base is bit-identical after training, ε is Opacus's."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from opacus.accountants import RDPAccountant

from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.privacy.hooks import GRAD_SAMPLE_MODES
from tests.foundation.models import DataModule, HFTextClassifier, TokenDataset, _bert_lora
from tests.privacy.helpers import trainer

MODES = [m for m in GRAD_SAMPLE_MODES if m != "auto"]


class LoRAClassifier(HFTextClassifier):
    """A user who hands every parameter (frozen base included) to the optimizer."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Inspect(pl.Callback):
    """At every noisy step: the DP optimizer's parameters and which parameters carry per-sample state."""

    def __init__(self) -> None:
        self.dp_params: list[set[int]] = []
        self.with_grad_sample: list[set[int]] = []
        self.with_grad: list[set[int]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.dp_params.append({id(p) for p in optimizer.params})
        params = list(pl_module.parameters())
        self.with_grad_sample.append({id(p) for p in params if getattr(p, "grad_sample", None) is not None})
        self.with_grad.append({id(p) for p in params if p.grad is not None})


def _fit(tmp_path, mode: str, **dp_options: Any):
    torch.manual_seed(0)
    module = LoRAClassifier(_bert_lora())
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    inspect = Inspect()
    dp = DifferentialPrivacy(
        noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", grad_sample_mode=mode, **dp_options
    )
    trainer(tmp_path, max_steps=3, callbacks=[dp, inspect]).fit(module, DataModule(TokenDataset))
    return module, dp, inspect, frozen, buffers, trainable


@pytest.mark.parametrize("mode", MODES)
def test_lora_under_dp_noises_only_the_adapters_and_keeps_the_base_bit_identical(tmp_path, mode):
    module, dp, inspect, frozen, buffers, trainable = _fit(tmp_path, mode)
    params = dict(module.named_parameters())
    trainable_ids = {id(params[n]) for n in trainable}
    assert (
        sum(t.numel() for t in frozen.values()) > 10 * sum(t.numel() for t in trainable.values()) > 0
    )  # mostly frozen
    assert len(inspect.dp_params) == 3 and all(ids == trainable_ids for ids in inspect.dp_params)
    for with_grad_sample, with_grad in zip(inspect.with_grad_sample, inspect.with_grad):
        assert with_grad_sample <= trainable_ids  # no per-sample gradient of a frozen parameter
        assert with_grad <= trainable_ids
        if mode in ("hooks", "functorch"):
            assert with_grad_sample == trainable_ids
    for name, before in frozen.items():
        assert torch.equal(params[name].detach(), before), name
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert all(not torch.equal(params[n].detach(), before) for n, before in trainable.items())
    reference = RDPAccountant()
    for _ in range(dp.steps):
        reference.step(noise_multiplier=1.0, sample_rate=dp.sample_rate)
    assert dp.steps == 3 and dp.epsilon_spent == pytest.approx(reference.get_epsilon(delta=1e-3), abs=1e-12)


def test_per_layer_clipping_splits_the_bound_over_the_adapters_only(tmp_path):
    module, dp, _, frozen, _, trainable = _fit(tmp_path, "hooks", clipping="per_layer", max_grad_norm=2.0)
    assert isinstance(dp.clip_norms, list) and len(dp.clip_norms) == len(trainable)
    assert dp.clip_norms == pytest.approx([2.0 / len(trainable) ** 0.5] * len(trainable))
    params = dict(module.named_parameters())
    assert all(torch.equal(params[n].detach(), before) for n, before in frozen.items())
