"""The DP optimizer: the user's optimizer wrapped in Opacus's ``DPOptimizer`` (clipping, noise,
and the step hook that feeds the accountant), and unwrapped again after fit; the checks and
adjustments of its per-sample gradients during training (accumulated batches, a pruned module),
and Lightning's DDP all-reduce switched off while ``DistributedDPOptimizer`` all-reduces the noisy sum.
Ghost and bk modes write the clipped sum to ``p.grad`` themselves: their optimizer only adds noise.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> dp = wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
    ...                     expected_batch_size=8)
    >>> type(dp).__name__, unwrap_optimizers([dp])[0] is dp.original_optimizer
    ('DPOptimizer', True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional, Union

from opacus.optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    get_optimizer_class,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_trust.privacy.loader import noise_generator

__all__ = [
    "CLIPPINGS",
    "ClippedSumOptimizer",
    "DistributedClippedSumOptimizer",
    "add_before_noise",
    "check_holds_parameters",
    "default_clip",
    "scale_grad_samples",
    "set_ddp_grad_sync",
    "single_optimizer",
    "unwrap_optimizers",
    "wrap_optimizer",
]

CLIPPINGS = ("flat", "per_layer")


def unwrap_optimizers(optimizers: Sequence[Optimizer]) -> list[Optimizer]:
    """The user's optimizers under any ``DPOptimizer``."""
    return [opt.original_optimizer if isinstance(opt, DPOptimizer) else opt for opt in optimizers]


def single_optimizer(optimizers: Sequence[Optimizer]) -> Optimizer:
    """The one user optimizer (under any ``DPOptimizer``); DP-SGD wraps exactly one."""
    unwrapped = unwrap_optimizers(optimizers)
    if len(unwrapped) != 1:
        raise ValueError(
            f"DifferentialPrivacy wraps one optimizer; configure_optimizers returned {len(unwrapped)}. Use one "
            "optimizer with several param groups."
        )
    return unwrapped[0]


def default_clip(
    max_grad_norm: Union[float, list[float]], clipping: str, params: Sequence[nn.Parameter]
) -> Union[float, list[float]]:
    """Flat clipping: the one bound. Per-layer: the list (one per parameter, in optimizer order), or
    one bound ``C`` split evenly, ``C / sqrt(#params)`` each, so the whole gradient is within ``C``."""
    if clipping != "per_layer":
        return max_grad_norm
    count = len(params)
    if isinstance(max_grad_norm, list):
        if len(max_grad_norm) != count:
            raise ValueError(f"`max_grad_norm` lists {len(max_grad_norm)} bounds for {count} parameters.")
        return list(max_grad_norm)
    return [max_grad_norm / math.sqrt(count)] * count


class ClippedSumOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for a ``p.grad`` that is already the clipped sum (ghost and bk modes):
    noise and averaging only; the sum of physical batches is kept with ``clone`` (Opacus's
    ``deepcopy`` of every gradient costs several ms a step on a small model)."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone()


class DistributedClippedSumOptimizer(DistributedDPOptimizerFastGradientClipping):
    """:class:`ClippedSumOptimizer` under DDP (noise on rank 0, one all-reduce of the noisy sum)."""

    accumulate = ClippedSumOptimizer.accumulate


def wrap_optimizer(
    optimizer: Optimizer,
    noise_multiplier: float,
    max_grad_norm: Union[float, list[float]],
    expected_batch_size: float,
    clipping: str = "flat",
    distributed: bool = False,
    grad_sample_mode: str = "hooks",
    secure_rng: bool = False,
    step_hook: Optional[Callable[[DPOptimizer], None]] = None,
) -> DPOptimizer:
    """``optimizer`` in the Opacus ``DPOptimizer`` for ``clipping`` (``DistributedDPOptimizer`` when
    ``distributed``; for ghost and bk modes Opacus's fast-gradient-clipping variant, which takes ``p.grad``
    as the clipped sum and only adds noise and averages); ``step_hook`` runs at every noisy step."""
    if clipping == "per_layer" and not isinstance(max_grad_norm, list):
        raise ValueError("Per-layer clipping needs one `max_grad_norm` per parameter.")
    if clipping != "per_layer" and isinstance(max_grad_norm, list):
        raise ValueError("Flat clipping needs one `max_grad_norm` for the whole gradient, not a list.")
    cls: type[DPOptimizer]
    if grad_sample_mode in ("ghost", "bk"):
        cls = DistributedClippedSumOptimizer if distributed else ClippedSumOptimizer
    else:
        cls = get_optimizer_class(clipping=clipping, distributed=distributed, grad_sample_mode="hooks")
    dp_optimizer: DPOptimizer = cls(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator(secure_rng),
        secure_mode=secure_rng,
    )
    if step_hook is not None:
        dp_optimizer.attach_step_hook(step_hook)
    return dp_optimizer


def add_before_noise(optimizer: DPOptimizer, hook: Callable[[DPOptimizer], None]) -> None:
    """Run ``hook(optimizer)`` at every noisy step after the clipped per-sample gradients are summed
    into ``p.summed_grad`` and before noise is added (white-box audit canaries join the sum there).

    Every optimizer :func:`wrap_optimizer` builds adds noise in ``add_noise``, which Opacus's
    ``pre_step`` calls once per logical step (not on skipped virtual steps), on every DDP rank.
    """
    add_noise = optimizer.add_noise

    def add_noise_after_hook() -> None:
        hook(optimizer)
        add_noise()

    optimizer.add_noise = add_noise_after_hook  # this instance only


def check_holds_parameters(optimizer: DPOptimizer, module: nn.Module) -> None:
    """Refuse a DP optimizer that still holds parameters ``module`` replaced (structural pruning)."""
    current = {id(p) for p in module.parameters()}
    stale = [p for p in optimizer.params if id(p) not in current]
    if stale:
        raise RuntimeError(
            f"The module's parameters were replaced during training, but the DP optimizer still holds {len(stale)} "
            "of the old ones: their clipped, noised gradients would not reach the model. A callback that changes "
            "the model's structure must point the optimizer's param_groups at the new parameters (as "
            "ProgressivePruning does)."
        )


def scale_grad_samples(optimizer: DPOptimizer, factor: float) -> None:
    """Multiply the per-sample gradients by ``factor`` (Lightning divided the loss by
    ``accumulate_grad_batches``; the true per-sample gradients are clipped)."""
    for p in optimizer.params:
        samples = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]
        for g in samples:
            if g is not None:
                g.mul_(factor)


def set_ddp_grad_sync(model: Optional[nn.Module], sync: bool) -> None:
    """Switch DDP's own gradient all-reduce on or off (the ``DistributedDPOptimizer`` all-reduces the
    noisy sum once; the raw, unclipped gradients need none)."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = sync
