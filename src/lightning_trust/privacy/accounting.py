"""Privacy accounting without a Trainer: sample rate, planned steps, the noise for a target ε,
ε spent, and how many steps a budget allows. Every number comes from Opacus's accountants.

An accountant history is Opacus's: a list of ``(noise_multiplier, sample_rate, steps)`` entries.

Example:
    >>> q = sample_rate_for(dataset_size=240, batch_size=24)
    >>> q, steps_per_epoch(q), planned_steps(q, max_epochs=3)
    (0.1, 10, 30)
    >>> history = extend_history([], noise_multiplier=1.1, sample_rate=q, steps=20)
    >>> history, steps_of(history)
    ([(1.1, 0.1, 20)], 20)
    >>> from opacus.accountants import RDPAccountant
    >>> reference = RDPAccountant()
    >>> reference.history = [(1.1, 0.1, 20)]
    >>> epsilon_of(history, delta=1e-3, accountant="rdp") == reference.get_epsilon(delta=1e-3)
    True
    >>> budget = epsilon_of(extend_history([], 1.0, 0.1, 7), 1e-3, "rdp")
    >>> steps_within_budget([], 1.0, 0.1, delta=1e-3, accountant="rdp", limit=budget + 1e-9, remaining=50)
    7
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "History",
    "accounting_problem",
    "check_accounting",
    "epsilon_of",
    "extend_history",
    "noise_for_epsilon",
    "planned_steps",
    "sample_rate_for",
    "steps_of",
    "steps_per_epoch",
    "steps_within_budget",
]

ACCOUNTANTS = ("prv", "rdp", "gdp")

#: Opacus's accountant history: ``(noise_multiplier, sample_rate, steps)`` per stretch of training.
History = list[tuple[float, float, int]]


def sample_rate_for(dataset_size: int, batch_size: int, world_size: int = 1, accumulate: int = 1) -> float:
    """The Poisson sample rate ``q`` of a loader of ``batch_size`` per rank over ``dataset_size`` rows.

    One logical batch is ``batch_size * world_size * accumulate`` samples in expectation; ``q`` is
    ``1 / (batches per epoch)``, so an epoch is ``int(1 / q)`` noisy steps, as in Opacus's ``DPDataLoader``.
    """
    return 1.0 / math.ceil(dataset_size / (batch_size * world_size * accumulate))


def steps_per_epoch(sample_rate: float) -> int:
    """Noisy steps per epoch of Poisson batches at ``sample_rate``."""
    return int(1 / sample_rate)


def planned_steps(
    sample_rate: float,
    max_steps: Optional[int] = None,
    max_epochs: Optional[int] = None,
    global_step: int = 0,
    physical_parts: int = 1,
    epoch_steps: Optional[int] = None,
) -> Optional[int]:
    """Noisy steps a fit can still take at most (``None``: unbounded).

    ``max_steps``/``global_step`` count Lightning's (physical) batches, ``physical_parts`` of them per
    noisy step with virtual batches; a non-positive limit means no limit, as in the Trainer. An epoch
    is ``epoch_steps`` noisy steps (default ``int(1 / q)``; fewer with ``limit_train_batches``), and
    the steps already taken (``global_step``, restored on resume, mid-epoch too) count against
    ``max_epochs``.
    """
    per_epoch = steps_per_epoch(sample_rate) if epoch_steps is None else epoch_steps
    done = global_step // physical_parts
    limits = []
    if max_steps is not None and max_steps > 0:
        limits.append(max(int(max_steps) - global_step, 0) // physical_parts)
    if max_epochs is not None and max_epochs > 0:
        limits.append(max(int(max_epochs) * per_epoch - done, 0))
    return min(limits) if limits else None


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: Optional[int],
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier that spends ``target_epsilon`` at ``delta`` in ``steps`` noisy steps
    (Opacus's ``get_noise_multiplier``), with an error that says what to change when none does."""
    if steps is None:
        raise ValueError(
            "`target_epsilon` needs a planned training length to find the noise: set Trainer(max_epochs=...) "
            "or Trainer(max_steps=...), or give `noise_multiplier` instead."
        )
    problem = accounting_problem([(1.0, sample_rate, 1)], delta, accountant)
    if problem is not None:
        raise ValueError(_delta_message(delta, sample_rate, accountant, problem))
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )
    except (ValueError, RuntimeError, ArithmeticError) as err:
        raise ValueError(
            f"target_epsilon={target_epsilon} at δ={delta:.3g} cannot be reached in "
            f"{steps} steps at sample rate {sample_rate:.4g} ({err}): no noise multiplier is large "
            "enough. Raise target_epsilon or target_delta, train fewer steps/epochs, or use a smaller batch."
        ) from err


def accounting_problem(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> Optional[str]:
    """Why Opacus's ``accountant`` cannot give a meaningful ε for ``history`` at ``delta`` (its
    error, or a negative ε: δ too large to mean anything); ``None`` when it can."""
    try:
        epsilon = epsilon_of(history, delta, accountant)
    except (ValueError, RuntimeError, ArithmeticError) as err:
        return f"{type(err).__name__}: {err}"
    if math.isnan(epsilon) or epsilon < 0:
        return f"ε = {epsilon:.3g}, so δ is too large for any guarantee"
    return None


def check_accounting(
    history: Sequence[tuple[float, float, int]],
    noise_multiplier: float,
    sample_rate: float,
    steps: Optional[int],
    delta: float,
    accountant: str,
) -> None:
    """Refuse a plan whose ε Opacus cannot compute (after one more step, and at the end of the
    ``steps`` planned), before training, naming δ and what to change."""
    if noise_multiplier == 0:
        return
    for extra in {1, max(steps or 1, 1)}:
        problem = accounting_problem(extend_history(history, noise_multiplier, sample_rate, extra), delta, accountant)
        if problem is not None:
            raise ValueError(_delta_message(delta, sample_rate, accountant, problem))


def _delta_message(delta: float, sample_rate: float, accountant: str, problem: str) -> str:
    return (
        f"target_delta={delta:.3g} cannot be accounted by Opacus's {accountant!r} accountant at sample rate "
        f"{sample_rate:.4g} ({problem}). Set target_delta well below 1/N but not vanishing (e.g. 1e-5)"
        + ("; for a very small δ use accountant='rdp'." if accountant == "prv" else ".")
    )


def steps_of(history: Sequence[tuple[float, float, int]]) -> int:
    """Noisy steps in an accountant history."""
    return int(sum(entry[2] for entry in history))


def extend_history(
    history: Sequence[tuple[float, float, int]], noise_multiplier: float, sample_rate: float, steps: int
) -> History:
    """``history`` followed by ``steps`` more steps at ``(noise_multiplier, sample_rate)``, merged into
    the last entry when it has the same parameters (as Opacus's accountants record them)."""
    out: History = [tuple(entry) for entry in history]  # type: ignore[misc]  # entries are 3-tuples
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        sigma, rate, count = out[-1]
        return out[:-1] + [(sigma, rate, count + steps)]
    return out + [(noise_multiplier, sample_rate, steps)]


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: Optional[float], accountant: str) -> float:
    """ε of ``history`` at ``delta`` under Opacus's ``accountant`` (0 with no steps, ``inf`` if any
    step had no noise)."""
    if not history or delta is None:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    opacus_accountant = create_accountant(accountant)
    opacus_accountant.history = list(history)
    return float(opacus_accountant.get_epsilon(delta=delta))


def steps_within_budget(
    history: Sequence[tuple[float, float, int]],
    noise_multiplier: float,
    sample_rate: float,
    delta: Optional[float],
    accountant: str,
    limit: Optional[float],
    remaining: Optional[int],
) -> Optional[int]:
    """Total noisy steps (``history`` included) that keep ε at or below ``limit``, continuing at
    ``(noise_multiplier, sample_rate)``; ``None`` when the limit does not bind within ``remaining``
    planned steps (or at all, for an unbounded plan). Found by bisection over Opacus's ε."""
    if limit is None:
        return None
    taken = steps_of(history)
    if noise_multiplier == 0:
        return taken

    def within(extra: int) -> bool:
        return epsilon_of(extend_history(history, noise_multiplier, sample_rate, extra), delta, accountant) <= limit

    if remaining is not None and within(remaining):
        return None
    if not within(1):
        return taken
    low, high = 1, 2
    if remaining is None:
        while within(high):
            low, high = high, high * 2
            if high > 2**31:
                return None
    else:
        high = remaining
    while high - low > 1:  # within(low) and not within(high)
        mid = (low + high) // 2
        if within(mid):
            low = mid
        else:
            high = mid
    return taken + low
