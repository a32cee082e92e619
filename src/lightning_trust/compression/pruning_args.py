"""The arguments of :class:`~lightning_trust.compression.ProgressivePruning`: refused early when bad,
and what they make it declare (its capabilities, and the refusal of a sparsity regularizer under
differential privacy).

Example:
    >>> validate_pruning_args(None, None, 2.0, "group_magnitude", "cubic", 1, 3, 1, None, 0.95, 0.0, None)
    (None, 0.5)
    >>> validate_pruning_args(0.5, None, None, "l1", "cubic", 1, 3, 1, None, 0.95, 0.0, None)
    Traceback (most recent call last):
    ...
    ValueError: `importance` must be one of ['bn_scale', 'group_magnitude', 'hessian', 'lamp', 'random', 'taylor'], got 'l1'.
    >>> sorted(c.name for c in pruning_capabilities(1e-4)), list(pruning_refusals(0.0))
    (['CHANGES_PARAMETERS', 'EDITS_GRADIENTS', 'EXTRA_PASSES'], [])
"""

from __future__ import annotations

from typing import Optional

from lightning_trust.compression.pruner import IMPORTANCES
from lightning_trust.compression.schedule import SCHEDULES
from lightning_trust.core.compat import Capability

__all__ = ["REGULARIZER_UNDER_DP", "pruning_capabilities", "pruning_refusals", "validate_pruning_args"]

#: Why a sparsity regularizer is refused next to a per-sample-gradient (DP) callback; the fix.
REGULARIZER_UNDER_DP = (
    "the DP optimizer replaces each gradient by its clipped, noised per-sample sum, so the regularizer's gradient "
    "would be silently dropped. Set `sparsity_regularization: 0` (pruning by importance works under DP)"
)


def validate_pruning_args(
    pruning_ratio: Optional[float],
    target_macs_ratio: Optional[float],
    target_speedup: Optional[float],
    importance: str,
    schedule: str,
    start_epoch: int,
    end_epoch: Optional[int],
    frequency: int,
    round_to: Optional[int],
    max_pruning_ratio: float,
    sparsity_regularization: float,
    ignored_layers: Optional[list[str]],
) -> tuple[Optional[float], Optional[float]]:
    """Refuse bad arguments early; returns ``(pruning_ratio, target_macs_ratio)``, one of them ``None``."""
    if target_macs_ratio is not None and target_speedup is not None:
        raise ValueError("Set `target_macs_ratio` or `target_speedup`, not both (target_speedup = 1 / macs ratio).")
    if target_speedup is not None:
        if target_speedup <= 1.0:
            raise ValueError(f"`target_speedup` must be > 1 (a MACs ratio dense/pruned), got {target_speedup}.")
        target_macs_ratio = 1.0 / target_speedup
    if target_macs_ratio is not None:
        if not 0.0 < target_macs_ratio < 1.0:
            raise ValueError(
                f"`target_macs_ratio` must be in (0, 1) (pruned MACs / dense MACs), got {target_macs_ratio}."
            )
        pruning_ratio = None
    elif pruning_ratio is None:
        raise ValueError("Set one of `pruning_ratio`, `target_macs_ratio` or `target_speedup`.")
    elif not 0.0 <= pruning_ratio < 1.0:
        raise ValueError(f"`pruning_ratio` must be in [0, 1) (share of channels removed), got {pruning_ratio}.")
    if importance not in IMPORTANCES:
        raise ValueError(f"`importance` must be one of {sorted(IMPORTANCES)}, got {importance!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be 'cubic', 'linear' or 'one_shot', got {schedule!r}.")
    if start_epoch < 0:
        raise ValueError(f"`start_epoch` must be >= 0, got {start_epoch}.")
    if end_epoch is not None and end_epoch < start_epoch:
        raise ValueError(f"`end_epoch` ({end_epoch}) must be >= `start_epoch` ({start_epoch}).")
    if frequency < 1:
        raise ValueError(f"`frequency` must be a positive number of epochs, got {frequency}.")
    if round_to is not None and round_to < 1:
        raise ValueError(f"`round_to` must be a positive integer, got {round_to}.")
    if not 0.0 < max_pruning_ratio < 1.0:
        raise ValueError(f"`max_pruning_ratio` must be in (0, 1), got {max_pruning_ratio}.")
    if pruning_ratio is not None and pruning_ratio > max_pruning_ratio:
        raise ValueError(
            f"`pruning_ratio` ({pruning_ratio}) exceeds `max_pruning_ratio` ({max_pruning_ratio}); raise the latter."
        )
    if sparsity_regularization < 0:
        raise ValueError(f"`sparsity_regularization` must be >= 0, got {sparsity_regularization}.")
    if ignored_layers is not None and not all(isinstance(n, str) for n in ignored_layers):
        raise TypeError(f"`ignored_layers` must be a list of module names (str), got {ignored_layers!r}.")
    return pruning_ratio, target_macs_ratio


def pruning_capabilities(sparsity_regularization: float) -> frozenset[Capability]:
    """Changes the parameters; runs extra passes (tracing, MACs, accuracy, latency); with a
    sparsity regularizer it also edits the gradients."""
    found = {Capability.CHANGES_PARAMETERS, Capability.EXTRA_PASSES}
    if sparsity_regularization > 0:
        found.add(Capability.EDITS_GRADIENTS)
    return frozenset(found)


def pruning_refusals(sparsity_regularization: float) -> dict[Capability, str]:
    """Per-sample gradients (DP-SGD), only with a sparsity regularizer (whose gradient DP would drop)."""
    if sparsity_regularization > 0:
        reason = f"with sparsity_regularization={sparsity_regularization} {REGULARIZER_UNDER_DP}"
        return {Capability.PER_SAMPLE_GRADIENTS: reason}
    return {}
