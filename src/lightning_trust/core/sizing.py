"""Passes sized to the overhead budget while they run: time the first unit of work (a chunk of
samples, a batch), then do only as many more units as :class:`~lightning_trust.core.budget.OverheadBudget`
still affords.

A pass during fit evaluates its units (the same ones, in the same order, for every attack, epsilon,
corruption and severity) in a fixed order, so that a pass cut short is a prefix of the whole. Its
first unit is timed; :meth:`PassSizer.count` then says how many units the pass does in all:

* the **final** pass (the report's number) uses what is left of the budget and never fewer than
  ``minimum`` units (:data:`MIN_SAMPLES` samples: a number worth reporting, with its interval);
* a pass that is **not final** also keeps room for the final pass (``reserve_units`` at the measured
  rate) within ``max_overhead`` of both the fit so far and the fit's projected time (the time so far /
  :func:`fraction_done`), and may stop after its first unit; :func:`affords_pass` says before it
  starts whether it may run at all (from the rate of an earlier pass, or an estimate).

The pass's own running time counts as spent, not as fit time; after its first unit a pass plans on
:data:`HEADROOM` of the spare time. Without a budget (``max_overhead=None``) or outside fit every unit runs.

Example:
    >>> from lightning_trust.core.budget import OverheadBudget
    >>> now = [0.0]
    >>> budget = OverheadBudget(0.05, clock=lambda: now[0])
    >>> budget.start(); now[0] = 100.0                    # 100 s of fit: 5 s to spend
    >>> sizer = PassSizer(budget, final=True)
    >>> now[0] += 1.0                                     # the first chunk of 64 samples took 1 s
    >>> sizer.count(done=64, total=512, minimum=64)       # 5 s - 1 s spent: 4 s, 90% of it: 230 more samples
    294
    >>> affords_pass(budget, unit_seconds=1 / 64, minimum=64, fraction_done=0.5)  # 1 s now, 1 s kept: fits
    True
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lightning_trust.core.budget import OverheadBudget

__all__ = ["HEADROOM", "MIN_SAMPLES", "PassSizer", "affords_pass", "fraction_done"]

#: The fewest samples a final pass evaluates, whatever the budget: a 95% Wilson interval of an
#: accuracy near 0.8 on 64 samples is about +-0.1, on fewer it says little.
MIN_SAMPLES = 64
#: The share of the spare budget a pass plans to use after its first unit: the rest is headroom for
#: what the first unit's rate does not foresee (the machine's load swings, the pass's own bookkeeping).
HEADROOM = 0.9


def fraction_done(trainer: Any) -> float:
    """The share of the fit done at the end of the current epoch (``max_epochs`` or ``max_steps``, the
    one reached first); 1.0 when neither bounds the fit (no projection)."""
    done = 0.0
    max_epochs = getattr(trainer, "max_epochs", None)
    if isinstance(max_epochs, int) and max_epochs > 0:
        done = max(done, (int(trainer.current_epoch) + 1) / max_epochs)
    max_steps = getattr(trainer, "max_steps", None)
    if isinstance(max_steps, int) and max_steps > 0:
        done = max(done, int(trainer.global_step) / max_steps)
    return min(done, 1.0) if done > 0 else 1.0


def _spare(budget: OverheadBudget, running: float, final: bool, done: float, reserve: float) -> float:
    """Seconds the rest of a pass may take; ``running``: what the pass has taken so far (not yet spent)."""
    assert budget.max_overhead is not None
    share = budget.max_overhead
    now = budget.allowance(running)  # the running part booked as the pass's cost, not as fit time
    if not final:
        projected = (budget.fit_seconds() - running) / min(max(done, 1e-9), 1.0)
        now = min(now, share * projected - budget.spent - running - reserve)
    return max(now, 0.0)


def affords_pass(
    budget: OverheadBudget,
    unit_seconds: float,
    minimum: int,
    fraction_done: float = 1.0,
    final: bool = False,
    reserve_units: Optional[int] = None,
) -> bool:
    """Whether a pass of at least ``minimum`` units of ``unit_seconds`` fits now, keeping
    ``reserve_units`` (default: as many again) for the final pass within the projected fit (always
    true for a final pass, without a budget or before a unit was measured)."""
    if final or budget.max_overhead is None or unit_seconds <= 0:
        return True
    cost = minimum * unit_seconds
    reserve = (minimum if reserve_units is None else reserve_units) * unit_seconds
    return _spare(budget, 0.0, final=False, done=fraction_done, reserve=reserve) >= cost


class PassSizer:
    """Sizes one pass of a budgeted callback while it runs (see the module docstring).

    Args:
        budget: the callback's budget; its clock times the pass from the sizer's creation.
        final: the pass the report shows (at least ``minimum`` units).
        fraction_done: the share of the fit done (:func:`fraction_done`), for a pass that is not final.
        reserve_units: units kept for the final pass (at the measured rate) by a pass that is not final.
        enabled: ``False``: no sizing, every unit runs (outside fit, or ``max_overhead=None``).
    """

    def __init__(
        self,
        budget: OverheadBudget,
        final: bool = True,
        fraction_done: float = 1.0,
        reserve_units: int = 0,
        enabled: bool = True,
    ) -> None:
        self.budget = budget
        self.final = final
        self.fraction_done = fraction_done
        self.reserve_units = reserve_units
        self.enabled = enabled and budget.max_overhead is not None
        self.started = budget.clock()

    def running(self) -> float:
        """Seconds since the pass started."""
        return self.budget.clock() - self.started

    def count(self, done: int, total: int, minimum: int = 0, share: float = 1.0, since: Optional[float] = None) -> int:
        """How many of ``total`` units the pass does in all, ``done`` of them done so far (in the time
        since ``since``, a reading of the budget's clock; default: the pass's start): ``done`` plus what
        the spare budget (times ``share``, for a part of the pass that others follow) affords at the
        measured rate; a final pass at least ``minimum``."""
        if not self.enabled or done <= 0 or done >= total:
            return total
        running = self.running()
        unit = (self.budget.clock() - (self.started if since is None else since)) / done
        if unit <= 0:
            return total
        spare = (
            _spare(self.budget, running, self.final, self.fraction_done, self.reserve_units * unit) * share * HEADROOM
        )
        n = done + math.floor(spare / unit + 1e-9)
        if self.final:
            n = max(n, min(minimum, total))
        return min(n, total)
