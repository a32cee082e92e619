"""Tied parameters under DP: hooks/functorch sum each sample's gradient over every use of a shared
weight before clipping (checked against one autograd call per sample); ghost clipping is refused
before the first step, naming grad_sample_mode='hooks'."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.privacy.tied import tied_parameters
from tests.foundation.models import build
from tests.privacy.dp_step import assert_update, dp_step, hand_update, without_dropout
from tests.privacy.helpers import trainer

VOCAB, LENGTH = 12, 5


class TiedLM(pl.LightningModule):
    """A next-token model whose output layer is its input embedding (weight tying, as GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, target = batch
        return F.cross_entropy(self(ids).flatten(0, 1), target.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Tokens(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        data = torch.randint(0, VOCAB, (64, LENGTH + 1), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=16)


def test_tied_parameters_are_found_by_layer():
    model = TiedLM()
    assert tied_parameters(model) == {"embed.weight": ["embed", "head"]}
    module, _ = build("gpt2_lm")
    assert tied_parameters(module) == {"model.transformer.wte.weight": ["model.transformer.wte", "model.lm_head"]}
    assert tied_parameters(build("bert")[0]) == {}


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_tied_weight_gets_the_summed_per_sample_gradient(tmp_path, mode):
    torch.manual_seed(0)
    model = TiedLM()
    dp, recorder = dp_step(tmp_path, model, Tokens(), 0.05, grad_sample_mode=mode)
    ids, target = recorder.batches[0]

    def sample_loss(m: nn.Module, i: int) -> torch.Tensor:  # mean over tokens, one sample: Opacus's g_i
        return F.cross_entropy(m(ids[i : i + 1]).flatten(0, 1), target[i].flatten())

    expected, norms = hand_update(model, recorder.before[0], len(ids), sample_loss, 0.05, dp.expected_batch_size)
    assert min(norms) > 0.05
    assert_update(model, recorder, expected)
    assert model.head.weight is model.embed.weight  # still tied after the step


def test_ghost_refuses_tied_weights_at_setup(tmp_path):
    model = TiedLM()
    fit = trainer(
        tmp_path, max_steps=1, callbacks=[DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost")]
    )
    with pytest.raises(
        ValueError, match=r"tied parameters .*embed\.weight in layers embed, head.*grad_sample_mode='hooks'"
    ):
        fit.fit(model, Tokens())
    assert fit.global_step == 0 and not hasattr(model.embed.weight, "grad_sample")


@pytest.mark.slow
def test_demo_transformer_reused_embedding_in_hooks_mode(tmp_path):
    torch.manual_seed(0)
    module, datamodule = build("demo_transformer")
    without_dropout(module)
    dp, recorder = dp_step(tmp_path, module, datamodule, 0.05, fix_module=True)
    inputs, target = recorder.batches[0]

    def sample_loss(m: nn.Module, i: int) -> torch.Tensor:  # the demo's token-mean NLL on one sample
        return F.nll_loss(m(inputs[i : i + 1], target[i : i + 1]), target[i])

    expected, norms = hand_update(module, recorder.before[0], len(inputs), sample_loss, 0.05, dp.expected_batch_size)
    assert min(norms) > 0.05
    assert_update(module, recorder, expected)


def test_ghost_refuses_the_reused_embedding_before_the_first_step(tmp_path):
    module, datamodule = build("demo_transformer")
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, grad_sample_mode="ghost", fix_module=True)
    fit = trainer(tmp_path, max_steps=1, callbacks=[dp])
    with pytest.raises(
        ValueError, match=r"layer `model\.embedding` \(Embedding\) is used twice.*grad_sample_mode='hooks'"
    ):
        fit.fit(module, datamodule)
    assert fit.global_step == 0
