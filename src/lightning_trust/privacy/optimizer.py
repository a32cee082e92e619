"""The DP optimizer: the user's optimizer wrapped in Opacus's ``DPOptimizer`` (clipping, noise,
and the step hook that feeds the accountant), and unwrapped again after fit.

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

from opacus.optimizers import DPOptimizer, get_optimizer_class
from torch import nn
from torch.optim import Optimizer

from lightning_trust.privacy.loader import noise_generator

__all__ = ["CLIPPINGS", "default_clip", "unwrap_optimizers", "wrap_optimizer"]

CLIPPINGS = ("flat", "per_layer")


def unwrap_optimizers(optimizers: Sequence[Optimizer]) -> list[Optimizer]:
    """The user's optimizers under any ``DPOptimizer``."""
    return [opt.original_optimizer if isinstance(opt, DPOptimizer) else opt for opt in optimizers]


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
    ``distributed``, fast-gradient-clipping variant for ghost mode); ``step_hook`` runs at every noisy step."""
    if clipping == "per_layer" and not isinstance(max_grad_norm, list):
        raise ValueError("Per-layer clipping needs one `max_grad_norm` per parameter.")
    if clipping != "per_layer" and isinstance(max_grad_norm, list):
        raise ValueError("Flat clipping needs one `max_grad_norm` for the whole gradient, not a list.")
    mode = "ghost" if grad_sample_mode == "ghost" else "hooks"
    cls = get_optimizer_class(clipping=clipping, distributed=distributed, grad_sample_mode=mode)
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
