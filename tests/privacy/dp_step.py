"""One DP step with noise 0 against a hand computation: the update must be ``-lr * sum_i
clip(g_i) / expected_batch_size`` with ``g_i`` from one autograd call per sample."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import BatchRecorder, trainer


def without_dropout(module: nn.Module) -> nn.Module:
    """Dropout off everywhere (the per-sample loop must see the same function as the batch)."""
    for layer in module.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
        if isinstance(layer, nn.MultiheadAttention):  # a float, becomes the DP attention's dropout layer
            layer.dropout = 0.0
    return module


def with_sgd(module: pl.LightningModule, lr: float = 1.0) -> pl.LightningModule:
    """The module's optimizer replaced by plain SGD over its trainable parameters (update = -lr * grad)."""
    module.configure_optimizers = lambda: torch.optim.SGD(  # type: ignore[method-assign]
        [p for p in module.parameters() if p.requires_grad], lr=lr
    )
    return module


def dp_step(
    tmp_path: Any, module: pl.LightningModule, datamodule: Any, max_grad_norm: float, **dp_kwargs: Any
) -> tuple[DifferentialPrivacy, BatchRecorder]:
    """Fit one noisy step (noise 0, SGD lr 1) and record the batch and the parameters around it."""
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=max_grad_norm, target_delta=1e-3, **dp_kwargs)
    trainer(tmp_path, max_steps=1, callbacks=[dp, recorder]).fit(with_sgd(module), datamodule=datamodule)
    return dp, recorder


def hand_update(
    module: nn.Module,
    before: list[Tensor],
    size: int,
    sample_loss: Callable[[nn.Module, int], Tensor],
    max_grad_norm: float,
    expected_batch_size: float,
) -> tuple[list[Tensor], list[float]]:
    """``sum_i clip(grad sample_loss(i)) / expected_batch_size`` over the trainable parameters of a
    copy of ``module`` holding ``before`` (all parameters, module order); also the per-sample norms."""
    model = copy.deepcopy(module)
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(size):
        grads = torch.autograd.grad(sample_loss(model, i), params, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (norm + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    return [t / expected_batch_size for t in total], norms


def assert_update(module: nn.Module, recorder: BatchRecorder, expected: list[Tensor], lr: float = 1.0) -> None:
    """The recorded step moved every trainable parameter by ``-lr * expected`` (frozen ones not at all)."""
    trainable = [p.requires_grad for p in module.parameters()]
    moves = iter(expected)
    for is_trainable, b, a in zip(trainable, recorder.before[0], recorder.after[0]):
        if is_trainable:
            torch.testing.assert_close(a, b - lr * next(moves), atol=1e-6, rtol=1e-4)
        else:
            assert torch.equal(a, b)
