"""What :class:`~lightning_trust.privacy.DifferentialPrivacy` refuses before training: arguments
that contradict each other or DP-SGD, and Trainer settings that break per-sample clipping.

Example:
    >>> check_arguments(target_epsilon=3.0, noise_multiplier=1.0)
    Traceback (most recent call last):
    ...
    ValueError: DifferentialPrivacy needs exactly one of `target_epsilon` (the noise is computed from it) or `noise_multiplier` (fixed noise); got target_epsilon=3.0, noise_multiplier=1.0.
    >>> check_arguments(noise_multiplier=1.0, max_grad_norm=[1.0, 0.5])
    Traceback (most recent call last):
    ...
    ValueError: A list `max_grad_norm` (one bound per parameter) needs `clipping='per_layer'`.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from typing import Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_trust.privacy.accounting import ACCOUNTANTS
from lightning_trust.privacy.fsdp import check_sharded
from lightning_trust.privacy.hooks import GRAD_SAMPLE_MODES
from lightning_trust.privacy.optimizer import CLIPPINGS
from lightning_trust.privacy.tied import check_ghost_ties

__all__ = ["SUPPORTED_PRECISIONS", "check_arguments", "check_trainer"]

#: Trainer precisions DP-SGD supports (fp16 loss scaling would scale per-sample gradients before clipping).
SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(name: str, value: object, fix: str) -> None:
    """Refuse a ``value`` that is not a finite real number (a string, a bool, NaN, infinity)."""
    if not _is_real(value):
        raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}); pass a float.")
    if not math.isfinite(float(value)):  # type: ignore[arg-type]  # a Real
        raise ValueError(f"`{name}` must be finite, got {value}; {fix}.")


def check_arguments(
    target_epsilon: Optional[float] = None,
    target_delta: Optional[float] = None,
    noise_multiplier: Optional[float] = None,
    max_grad_norm: Union[float, list[float]] = 1.0,
    accountant: str = "prv",
    poisson_sampling: bool = True,
    clipping: str = "flat",
    grad_sample_mode: str = "hooks",
    max_physical_batch_size: Optional[int] = None,
    secure_rng: bool = False,
    stop_at_epsilon: Optional[float] = None,
    epsilon_tolerance: float = 0.01,
    dataset_size: Optional[int] = None,
    log_every_n_steps: Optional[int] = None,
    fix_module: bool = False,
    per_sample_loss: bool = False,
) -> None:
    """Raise ``ValueError`` naming the fix for arguments of ``DifferentialPrivacy`` that cannot work
    (a wrong type, a value out of range, NaN or infinity where a finite number is needed)."""
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError(
            "DifferentialPrivacy needs exactly one of `target_epsilon` (the noise is computed from it) or "
            f"`noise_multiplier` (fixed noise); got target_epsilon={target_epsilon}, "
            f"noise_multiplier={noise_multiplier}."
        )
    flags = (("poisson_sampling", poisson_sampling), ("secure_rng", secure_rng), ("fix_module", fix_module))
    for flag, value in (*flags, ("per_sample_loss", per_sample_loss)):
        if not isinstance(value, bool):
            raise ValueError(f"`{flag}` must be True or False, got {value!r} ({type(value).__name__}).")
    if target_epsilon is not None:
        _finite("target_epsilon", target_epsilon, "for no noise (debugging only) set `noise_multiplier=0` instead")
        if not target_epsilon > 0:
            raise ValueError(f"`target_epsilon` must be > 0, got {target_epsilon}.")
    if noise_multiplier is not None:
        _finite("noise_multiplier", noise_multiplier, "set a finite noise multiplier such as 1.0")
        if not noise_multiplier >= 0:
            raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier}.")
    if target_delta is not None:
        _finite("target_delta", target_delta, "set target_delta=1e-5 (well below 1/N)")
        if not 0 < target_delta < 1:
            raise ValueError(f"`target_delta` must be in (0, 1), got {target_delta}; a typical value is 1e-5.")
    norms = max_grad_norm if isinstance(max_grad_norm, (list, tuple)) else [max_grad_norm]
    if not norms or any(not _is_real(c) or not math.isfinite(c) or not c > 0 for c in norms):
        raise ValueError(
            f"`max_grad_norm` must be a finite positive number (or a list of them), got {max_grad_norm!r}: it is the "
            "per-sample clipping bound the noise is scaled to (an infinite one clips nothing and makes the noise "
            "infinite). Set max_grad_norm=1.0 (or about the typical per-sample gradient norm)."
        )
    for name, choice in (("accountant", accountant), ("clipping", clipping), ("grad_sample_mode", grad_sample_mode)):
        if not isinstance(choice, str):
            raise ValueError(f"`{name}` must be a string, got {choice!r} ({type(choice).__name__}).")
    if isinstance(max_grad_norm, (list, tuple)) and clipping != "per_layer":
        raise ValueError("A list `max_grad_norm` (one bound per parameter) needs `clipping='per_layer'`.")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if clipping not in CLIPPINGS:
        raise ValueError(f"`clipping` must be one of {CLIPPINGS}, got {clipping!r}.")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
    if grad_sample_mode == "ghost" and clipping != "flat":
        raise ValueError("Opacus's ghost clipping supports only `clipping='flat'`; use grad_sample_mode='hooks'.")
    if grad_sample_mode == "bk" and clipping != "flat":
        raise ValueError(
            "grad_sample_mode='bk' clips the whole per-sample gradient, so it supports only `clipping='flat'`; use "
            "grad_sample_mode='hooks' (or 'auto', which picks hooks for per-layer clipping)."
        )
    for name, count in (
        ("max_physical_batch_size", max_physical_batch_size),
        ("dataset_size", dataset_size),
        ("log_every_n_steps", log_every_n_steps),
    ):
        if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1):
            raise ValueError(f"`{name}` must be a positive integer (or None), got {count!r} ({type(count).__name__}).")
    if max_physical_batch_size is not None and not poisson_sampling:
        raise ValueError("`max_physical_batch_size` splits Poisson batches; it needs `poisson_sampling=True`.")
    if stop_at_epsilon is not None:
        _finite("stop_at_epsilon", stop_at_epsilon, "pass stop_at_epsilon=None for no budget")
        if not stop_at_epsilon > 0:
            raise ValueError(f"`stop_at_epsilon` must be > 0, got {stop_at_epsilon}.")
    _finite("epsilon_tolerance", epsilon_tolerance, "keep the default 0.01")
    if not epsilon_tolerance > 0:
        raise ValueError(f"`epsilon_tolerance` must be > 0, got {epsilon_tolerance}.")
    if secure_rng and importlib.util.find_spec("torchcsprng") is None:
        raise ValueError(
            "`secure_rng=True` needs cryptographically secure randomness from `torchcsprng` "
            "(`pip install torchcsprng`); it is not installed. Set `secure_rng=False` to use torch's RNG."
        )


def check_trainer(trainer: pl.Trainer, grad_sample_mode: str, max_physical_batch_size: Optional[int]) -> int:
    """Refuse Trainer settings that break DP-SGD (and ghost clipping of a tied model); return
    ``accumulate_grad_batches``."""
    check_sharded(trainer.strategy)
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"DifferentialPrivacy supports single-device and DDP training, not {type(trainer.strategy).__name__}; "
            "use `strategy='ddp'` (or 'auto' on one device)."
        )
    if str(trainer.precision) not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"DifferentialPrivacy does not support `precision={trainer.precision!r}`: fp16 loss scaling scales the "
            "per-sample gradients before they are clipped, and Opacus has no fp16 grad samplers. "
            f"Use one of {SUPPORTED_PRECISIONS}."
        )
    if trainer.gradient_clip_val:
        raise ValueError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips the summed gradient, which DP-SGD "
            "replaces by per-sample clipping; remove it and set `DifferentialPrivacy(max_grad_norm=...)` instead."
        )
    module = trainer.strategy.lightning_module
    if module is not None:
        check_ghost_ties(module, grad_sample_mode)
        if grad_sample_mode == "ghost" and type(module).forward is pl.LightningModule.forward:
            raise ValueError(
                f"grad_sample_mode='ghost' injects the clipped gradient at the outputs of `{type(module).__name__}"
                ".forward`, but it defines no `forward` (training_step calls a submodule, e.g. "
                "`self.model(**batch).loss`). Define `forward` and call `self(...)` in training_step (the model's "
                "own `.loss` is fine), or use grad_sample_mode='hooks' (or 'bk')."
            )
    accumulate = int(trainer.accumulate_grad_batches)
    if accumulate > 1 and grad_sample_mode in ("ghost", "bk"):
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r}: Opacus's ghost clipping takes one backward pass per optimizer "
            "step (and so does bk), so it cannot be combined with "
            f"Trainer(accumulate_grad_batches={accumulate}); use grad_sample_mode='hooks' or "
            "`max_physical_batch_size` for memory."
        )
    if accumulate > 1 and max_physical_batch_size is not None:
        raise ValueError(
            "Use either Trainer(accumulate_grad_batches) or DifferentialPrivacy(max_physical_batch_size) to split "
            "logical batches, not both."
        )
    return accumulate
