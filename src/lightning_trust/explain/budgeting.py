"""How :class:`~lightning_trust.explain.Attribution` spends its overhead budget
(:class:`~lightning_trust.core.OverheadBudget`): which pass is final (always run), and whether the
costly part of a pass (``sensitivity_max``) still fits, and whether a pass that is not final may run:
its expected cost (the first pass's estimated before it runs, see
:func:`~lightning_trust.explain.plan.estimate_pass`), plus as much again kept for the final pass,
must fit the budget.

Example:
    >>> from lightning_trust.core import OverheadBudget
    >>> now = [0.0]
    >>> budget = OverheadBudget(0.05, clock=lambda: now[0])
    >>> budget.start(); now[0] = 100.0
    >>> fits_budget(budget, running=1.0, expected=3.0), fits_budget(budget, running=1.0, expected=6.0)
    (True, False)
    >>> allows_pass(budget, estimate=2.0), allows_pass(budget, estimate=6.0), budget.skipped  # 5% of 100 s
    (True, False, 1)
    >>> allows_pass(budget, estimate=2.0, reserve=1.0, fraction_done=0.5)  # 2 + 2 kept <= 5% of 200 s
    True
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.trainer.states import TrainerFn

from lightning_trust.core.budget import OverheadBudget

__all__ = ["allows_pass", "fits_budget", "is_final_pass"]


def is_final_pass(trainer: Any, stage: str, runs_at_fit_end: bool) -> bool:
    """The pass the report shows (always run, whatever the budget): at fit or test end, in a standalone
    validation, or at the last epoch's validation when no pass follows at fit end."""
    if stage != "validation_end" or getattr(getattr(trainer, "state", None), "fn", None) != TrainerFn.FITTING:
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    last = max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs - 1
    return last and not runs_at_fit_end


def fits_budget(budget: OverheadBudget, running: float, expected: float) -> bool:
    """Whether ``expected`` more seconds in the pass running for ``running`` seconds keep the passes
    within ``max_overhead`` of the fit's own time (always, without a budget)."""
    if budget.max_overhead is None:
        return True
    return budget.spent + running + expected <= budget.max_overhead * (budget.fit_seconds() - running)


def allows_pass(
    budget: OverheadBudget,
    estimate: Optional[float],
    final: bool = False,
    reserve: float = 0.0,
    fraction_done: float = 1.0,
) -> bool:
    """Whether a due pass may run now (a refusal is counted as skipped; a ``final`` pass always runs).

    Its expected cost is the mean of the passes timed so far, or ``estimate`` before any (``None``: no
    estimate, the first pass runs). It must fit within ``max_overhead`` of the fit's time so far, and with
    the final pass still to come (``reserve``: its expected cost in passes, 1 + the work deferred to it),
    the expected cost plus ``reserve`` times it, kept for the final pass, must fit within ``max_overhead``
    of the whole fit's projected time (the time so far / ``fraction_done``).
    """
    if final or budget.max_overhead is None:
        return True
    if budget.runs:
        expected = budget.expected_cost()
    elif estimate is None:
        return True
    else:
        expected = estimate
    fit = budget.fit_seconds()
    allowed = budget.spent + expected <= budget.max_overhead * fit
    if reserve:
        projected = fit / min(max(fraction_done, 1e-9), 1.0)
        allowed = allowed and budget.spent + (1 + reserve) * expected <= budget.max_overhead * projected
    if not allowed:
        budget.skipped += 1
    return allowed
