"""Causal attention under DP: ``fix_module=True`` swaps ``nn.MultiheadAttention`` for a DP attention
with the same outputs (every mask kind, both layouts) that trains with exact per-sample gradients."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_trust.privacy.causal import CausalDPMultiheadAttention, replace_attention
from lightning_trust.privacy.hooks import check_module
from tests.foundation.models import build
from tests.privacy.dp_step import assert_update, dp_step, hand_update

B, L, S, E, H = 3, 5, 6, 8, 2


def _masks(kind: str, source: int) -> dict[str, Any]:
    causal = torch.ones(L, source, dtype=torch.bool).triu(1)
    padding = torch.zeros(B, source, dtype=torch.bool)
    padding[0, -2:] = True
    if kind == "causal_float":
        return {"attn_mask": torch.zeros(L, source).masked_fill(causal, float("-inf")), "is_causal": True}
    if kind == "causal_bool":
        return {"attn_mask": causal}
    if kind == "padding":
        return {"key_padding_mask": padding}
    if kind == "3d_and_padding":
        return {"attn_mask": torch.randn(B * H, L, source), "key_padding_mask": padding}
    return {}


@pytest.mark.parametrize("kind", ["none", "causal_float", "causal_bool", "padding", "3d_and_padding"])
@pytest.mark.parametrize(
    "options",
    [
        {"batch_first": True},
        {"batch_first": False},
        {"batch_first": True, "kdim": 4, "vdim": 7},
        {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True},
        {"batch_first": False, "bias": False},
    ],
)
@pytest.mark.parametrize("need_weights", [False, True])
def test_same_outputs_as_multihead_attention(kind, options, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **options).eval()
    dp = CausalDPMultiheadAttention.from_module(mha).eval()
    first = options["batch_first"]
    shape = (lambda n: (B, n)) if first else (lambda n: (n, B))
    q = torch.randn(*shape(L), E)
    k = torch.randn(*shape(S), options.get("kdim", E))
    v = torch.randn(*shape(S), options.get("vdim", E))
    masks = _masks(kind, S)
    want, want_weights = mha(q, k, v, need_weights=need_weights, **masks)
    if masks.get("is_causal") and (options.get("add_bias_kv") or options.get("add_zero_attn")) and not need_weights:
        # torch's fused path drops the given mask for SDPA's own causal mask over the S + 2 columns (bias and
        # zero rows masked too); its need_weights path, like ours, applies the given mask with those columns open
        want = mha(q, k, v, need_weights=True, **masks)[0]
    got, got_weights = dp(q, k, v, need_weights=need_weights, **masks)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_weights, want_weights, atol=1e-6, rtol=1e-5)
    else:
        assert got_weights is None


def test_is_causal_without_a_mask_builds_the_causal_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    dp = CausalDPMultiheadAttention.from_module(mha).eval()
    x = torch.randn(B, L, E)
    want = mha(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(L), is_causal=True)[0]
    torch.testing.assert_close(dp(x, x, x, is_causal=True)[0], want, atol=1e-6, rtol=1e-5)


def test_replacement_keeps_frozen_weights_frozen_and_the_device():
    model = nn.Sequential(nn.MultiheadAttention(E, H))
    model[0].in_proj_weight.requires_grad_(False)
    assert replace_attention(model) == ["0"]
    dp = model[0]
    assert isinstance(dp, CausalDPMultiheadAttention)
    assert not dp.qlinear.weight.requires_grad and dp.qlinear.bias.requires_grad and dp.out_proj.weight.requires_grad


def test_fixed_demo_transformer_has_the_original_outputs():
    module, datamodule = build("demo_transformer")
    original = copy.deepcopy(module)
    check_module(module, fix_module=True)
    replaced = [n for n, m in module.named_modules() if isinstance(m, CausalDPMultiheadAttention)]
    assert len(replaced) == 6 and not any(type(m) is nn.MultiheadAttention for m in module.modules())
    inputs, target = next(iter(datamodule.train_dataloader()))
    module.eval(), original.eval()
    with torch.no_grad():
        want, got = original(inputs, target), module(inputs, target)
    torch.testing.assert_close(got.exp(), want.exp(), atol=1e-6, rtol=0)  # next-token probabilities
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)  # their logs


class CausalEncoder(pl.LightningModule):
    """A tiny causal encoder (sequence-first, with attention bias rows) predicting the next token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, E)
        self.attn = nn.MultiheadAttention(E, H, add_bias_kv=True)
        self.out = nn.Linear(E, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, L, E)
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        seq_first = x.transpose(0, 1)
        h = self.attn(seq_first, seq_first, seq_first, attn_mask=mask, need_weights=False)[0]
        return self.out(h.transpose(0, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, target = batch
        return F.cross_entropy(self(ids).flatten(0, 1), target.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Tokens(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        data = torch.randint(0, 10, (64, L + 1), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=16)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_fixed_causal_attention_trains_with_exact_per_sample_gradients(tmp_path, mode):
    torch.manual_seed(0)
    model = CausalEncoder()
    dp, recorder = dp_step(tmp_path, model, Tokens(), 0.05, fix_module=True, grad_sample_mode=mode)
    assert isinstance(model.attn, CausalDPMultiheadAttention)
    ids, target = recorder.batches[0]

    def sample_loss(m: nn.Module, i: int) -> torch.Tensor:
        return F.cross_entropy(m(ids[i : i + 1]).flatten(0, 1), target[i].flatten())

    expected, norms = hand_update(model, recorder.before[0], len(ids), sample_loss, 0.05, dp.expected_batch_size)
    assert min(norms) > 0.05
    assert_update(model, recorder, expected)
