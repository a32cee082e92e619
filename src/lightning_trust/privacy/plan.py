"""The plan of a private run, made when :class:`~lightning_trust.privacy.DifferentialPrivacy`
sees its first train loader: N, the sample rate q, δ and the expected (logical) batch size; the
noisy steps this fit plans, the noise multiplier (the callback's overridable
:meth:`~lightning_trust.privacy.DifferentialPrivacy.noise_plan`, once per run: a resumed run keeps
the checkpoint's), the DP optimizer with the clipping bounds of its
:meth:`~lightning_trust.privacy.DifferentialPrivacy.clip_plan`, and how many noisy steps
``stop_at_epsilon`` allows; and the part of the plan a checkpoint keeps.

The functions fill in the callback's plan (its ``num_samples``, ``sample_rate``, ``delta``,
``expected_batch_size``, ``planned_steps``, ``noise_multiplier`` and ``clip_norms``); the numbers
come from :mod:`~lightning_trust.privacy.accounting`.

Example:
    >>> from lightning_trust.privacy import DifferentialPrivacy
    >>> dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", stop_at_epsilon=2.0)
    >>> resolve_training_set(dp, size=1000, sample_rate=0.01, world=1)
    >>> dp.delta, dp.expected_batch_size
    (0.001, 10.0)
    >>> budget_steps(dp, remaining=None) > 0
    True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_trust.core import warn_once
from lightning_trust.privacy.accounting import check_accounting, planned_steps, steps_per_epoch, steps_within_budget
from lightning_trust.privacy.optimizer import single_optimizer
from lightning_trust.privacy.samplers import VirtualBatchSampler

if TYPE_CHECKING:
    from lightning_trust.privacy.callback import DifferentialPrivacy

__all__ = [
    "budget_steps",
    "epoch_steps",
    "plan_fit",
    "plan_optimizer",
    "plan_state",
    "resolve_training_set",
    "resume_plan",
]


def resolve_training_set(dp: DifferentialPrivacy, size: int, sample_rate: float, world: int) -> None:
    """Fix N, q, δ and the expected batch size (first loader the callback sees)."""
    dp.num_samples, dp.sample_rate, dp.world_size = size, sample_rate, world
    restored = dp._restored or {}
    if restored and restored.get("sample_rate") not in (None, sample_rate):
        warn_once(
            dp,
            "sample_rate_changed",
            f"The sample rate changed from {restored['sample_rate']} (checkpoint) to {sample_rate}; the "
            "accountant composes both.",
        )
    if dp.delta is None:
        dp.delta = 1.0 / size
        rank_zero_info(
            f"DifferentialPrivacy: target_delta defaults to 1/N = {dp.delta:.3g}; set a smaller δ (e.g. 1e-5) "
            "for a meaningful guarantee."
        )
    dp.expected_batch_size = sample_rate * size / world
    if dp.max_physical_batch_size is not None:
        dp._opacus.physical_parts = VirtualBatchSampler.parts_for(dp.expected_batch_size, dp.max_physical_batch_size)


def plan_fit(dp: DifferentialPrivacy, trainer: pl.Trainer) -> Optional[int]:
    """Planned steps of this fit (returned; ``None``: unbounded) and, the first time, the noise
    multiplier (:meth:`~lightning_trust.privacy.DifferentialPrivacy.noise_plan`)."""
    assert dp.sample_rate is not None
    remaining = planned_steps(
        dp.sample_rate,
        max_steps=trainer.max_steps,
        max_epochs=trainer.max_epochs,
        global_step=trainer.global_step,  # restored on resume; counts physical batches with virtual batching
        physical_parts=dp._opacus.physical_parts,
        epoch_steps=epoch_steps(
            dp.sample_rate, trainer.limit_train_batches, dp._opacus.physical_parts, dp._opacus.accumulate
        ),
    )
    dp.planned_steps = None if remaining is None else dp.steps + remaining
    if not dp._noise_planned:
        noise = float(dp.noise_plan(dp.sample_rate, remaining))
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"`noise_plan` must return a finite noise multiplier >= 0, got {noise}.")
        dp.noise_multiplier, dp._noise_planned = noise, True
    assert dp.delta is not None and dp.noise_multiplier is not None
    check_accounting(dp._accountant.history, dp.noise_multiplier, dp.sample_rate, remaining, dp.delta, dp.accountant)
    if dp.noise_multiplier == 0:
        warn_once(dp, "no_noise", "DifferentialPrivacy(noise_multiplier=0): no noise, ε is infinite (debugging only).")
    rank_zero_info(
        f"DifferentialPrivacy: N={dp.num_samples}, sample rate {dp.sample_rate:.4g}, noise multiplier "
        f"{dp.noise_multiplier:.4g}, max_grad_norm {dp.max_grad_norm}, {dp.accountant} accountant, "
        f"planned steps {dp.planned_steps}."
    )
    return remaining


def epoch_steps(sample_rate: float, limit_train_batches: Union[int, float, None], parts: int, accumulate: int) -> int:
    """Noisy steps in one epoch of the private loader (``parts`` physical batches per noisy step with
    virtual batches, ``accumulate`` with gradient accumulation), cut as Lightning cuts the epoch to
    ``limit_train_batches`` (a number of batches, or a fraction of them).

    >>> epoch_steps(0.1, 1.0, 1, 1), epoch_steps(0.1, 3, 1, 1), epoch_steps(0.1, 0.5, 5, 1), epoch_steps(0.1, 5, 1, 2)
    (10, 3, 5, 3)
    """
    batches = steps_per_epoch(sample_rate) * parts * accumulate
    if isinstance(limit_train_batches, bool) or limit_train_batches is None:
        limited = batches
    elif isinstance(limit_train_batches, int):
        limited = min(batches, limit_train_batches)
    else:
        limited = int(batches * float(limit_train_batches))
    # Lightning steps at an epoch's last batch even mid-accumulation; a cut virtual batch takes no step
    return math.ceil(limited / accumulate) if accumulate > 1 else limited // parts


def plan_optimizer(dp: DifferentialPrivacy, trainer: pl.Trainer) -> None:
    """The Trainer's optimizer in a ``DPOptimizer`` clipping to the bounds of the callback's
    :meth:`~lightning_trust.privacy.DifferentialPrivacy.clip_plan` (kept as its ``clip_norms``)."""
    optimizer = single_optimizer(trainer.strategy.optimizers)
    assert dp.noise_multiplier is not None and dp.expected_batch_size is not None
    # the parameters Opacus clips and noises: frozen ones (a LoRA base) are not the DP optimizer's
    dp.clip_norms = dp.clip_plan([p for group in optimizer.param_groups for p in group["params"] if p.requires_grad])
    dp._opacus.wrap(
        trainer,
        optimizer,
        dp.clip_norms,
        noise_multiplier=dp.noise_multiplier,
        expected_batch_size=dp.expected_batch_size,
        clipping=dp.clipping,
        distributed=dp.world_size > 1,
        secure_rng=dp.secure_rng,
        step_hook=dp._on_noisy_step,
    )


def budget_steps(dp: DifferentialPrivacy, remaining: Optional[int]) -> Optional[int]:
    """Total noisy steps allowed by ``stop_at_epsilon`` within the ``remaining`` planned ones
    (``None``: no limit within the plan)."""
    assert dp.noise_multiplier is not None and dp.sample_rate is not None
    return steps_within_budget(
        dp._accountant.history,
        dp.noise_multiplier,
        dp.sample_rate,
        dp.delta,
        dp.accountant,
        dp.stop_at_epsilon,
        remaining,
    )


def plan_state(dp: DifferentialPrivacy) -> dict[str, Any]:
    """What a checkpoint keeps so a resumed run continues the same accounting (:func:`resume_plan`)."""
    return {
        "accountant": dict(dp._accountant.state_dict()),
        "noise_multiplier": dp.noise_multiplier,
        "sample_rate": dp.sample_rate,
        "delta": dp.delta,
        "dataset_size": dp.num_samples,
        "max_grad_norm": dp.max_grad_norm,
        "curve": [list(point) for point in dp.epsilon_curve],
        "stopped_at_budget": dp.stopped_at_budget,
    }


def resume_plan(dp: DifferentialPrivacy, state_dict: dict[str, Any]) -> None:
    """Continue the checkpoint's accounting: its accountant history, ε curve, δ and (for a target ε,
    or a plan chosen by :meth:`~lightning_trust.privacy.DifferentialPrivacy.noise_plan`) its noise."""
    mechanism = state_dict["accountant"].get("mechanism")
    if mechanism != dp.accountant:
        raise ValueError(
            f"The checkpoint's privacy accounting used the {mechanism!r} accountant, this callback "
            f"{dp.accountant!r}; set `accountant={mechanism!r}` to continue the same budget."
        )
    dp._restored = dict(state_dict)
    dp._accountant.load_state_dict(state_dict["accountant"])
    dp._accountant.history = [tuple(entry) for entry in dp._accountant.history]
    dp.epsilon_curve = [(int(s), float(e)) for s, e in state_dict.get("curve", [])]
    if dp.target_epsilon is not None or dp.noise_multiplier is None:
        dp.noise_multiplier = state_dict["noise_multiplier"]  # the noise planned for this run's target
        dp._noise_planned = True
    elif dp.noise_multiplier != state_dict["noise_multiplier"]:
        warn_once(
            dp,
            "noise_changed",
            f"Resuming with noise_multiplier={dp.noise_multiplier}; the checkpoint's steps used "
            f"{state_dict['noise_multiplier']}. The accountant composes both.",
        )
    dp.delta = state_dict["delta"]
    dp._last_seen_steps = dp.steps
