"""A forward that takes several positional tensors: Lightning's own LightningTransformer."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import Tensor, nn

from lightning_trust.core import BatchContract, PositionalInputs, batch_size_of, call_module, forward_no_grad


class OneInput(nn.Module):
    def forward(self, x: Tensor, scale: Optional[float] = None) -> Tensor:
        return x * (scale or 1.0)


def test_lightning_transformer_gets_both_of_its_positional_inputs() -> None:
    torch.manual_seed(0)
    module = LightningTransformer(vocab_size=33)
    inputs, target = torch.randint(0, 33, (4, 6)), torch.randint(0, 33, (4, 6))
    contract = BatchContract().bind(module)
    got = contract.inputs((inputs, target))
    assert isinstance(got, PositionalInputs) and got[0] is inputs and got[1] is target
    assert contract.target((inputs, target)) is target
    assert batch_size_of((inputs, target), contract) == 4
    module.eval()
    expected = module(inputs, target).detach()
    assert torch.equal(call_module(module, got).detach(), expected)
    # under no_grad torch takes the transformer's fused fast path: equal to float precision
    assert torch.allclose(forward_no_grad(module, got), expected, atol=1e-5)


def test_a_single_required_input_stays_a_tensor() -> None:
    contract = BatchContract().bind(OneInput())
    x = torch.ones(3, 2)
    assert contract.inputs((x, torch.zeros(3))) is x
    # an explicit input position wins over the signature
    module = LightningTransformer(vocab_size=9)
    explicit = BatchContract(input_key=0).bind(module)
    assert explicit.inputs((x, torch.zeros(3))) is x


def test_an_unbound_contract_reads_position_zero() -> None:
    x = torch.ones(3, 2)
    assert BatchContract().inputs((x, torch.zeros(3))) is x


def test_macs_of_several_positional_inputs_equal_torch_pruning() -> None:
    import torch_pruning as tp

    from lightning_trust.core.macs import count_macs_params

    module = LightningTransformer(vocab_size=33)
    batch = PositionalInputs((torch.randint(0, 33, (4, 6)), torch.randint(0, 33, (4, 6))))
    one = (batch[0][:1], batch[1][:1])
    assert count_macs_params(module, batch) == tuple(float(v) if i == 0 else int(v) for i, v in
                                                     enumerate(tp.utils.count_ops_and_params(module, one)))  # fmt: skip
