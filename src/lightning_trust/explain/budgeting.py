"""How :class:`~lightning_trust.explain.Attribution` spends its overhead budget
(:class:`~lightning_trust.core.OverheadBudget`): which pass is final (always run), whether a pass that
is not final may run, and how much of the optional work of a pass that runs still fits.

A pass that is not final runs when its expected cost (the first pass's estimated before it runs, see
:func:`~lightning_trust.explain.plan.estimate_pass`), plus the final pass's kept for it, fits the
budget. A pass that runs always computes its minimum: the attributions of the fixed samples (with
the method's own ``n_steps``: fewer would change the method's result), their convergence delta and
``infidelity`` (a forward per perturbation: cheap). Its ``sensitivity_max`` (an attribution per
perturbation, the costly metric) runs only with the perturbations that fit what is left
(:func:`sensitivity_perturbations`); what it drops is recorded (:func:`dropped_entry`).

Example:
    >>> from lightning_trust.core import OverheadBudget
    >>> now = [0.0]
    >>> budget = OverheadBudget(0.05, clock=lambda: now[0])
    >>> budget.start(); now[0] = 100.0
    >>> allows_pass(budget, estimate=2.0), allows_pass(budget, estimate=6.0), budget.skipped  # 5% of 100 s
    (True, False, 1)
    >>> allows_pass(budget, estimate=2.0, reserve=1.0, fraction_done=0.5)  # 2 + 2 kept <= 5% of 200 s
    True
    >>> now[0] = 101.0  # a final pass that has run 1 s: 4 s are left, an attribution costs 1.2 s
    >>> sensitivity_perturbations(budget, running=1.0, unit_seconds=1.2, configured=5)  # 1 + 2 attributions
    2
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.trainer.states import TrainerFn

from lightning_trust.core.budget import OverheadBudget

__all__ = ["allows_pass", "dropped_entry", "is_final_pass", "sensitivity_perturbations"]


def is_final_pass(trainer: Any, stage: str, runs_at_fit_end: bool) -> bool:
    """The pass the report shows (always run, whatever the budget): at fit or test end, in a standalone
    validation, or at the last epoch's validation when no pass follows at fit end."""
    if stage != "validation_end" or getattr(getattr(trainer, "state", None), "fn", None) != TrainerFn.FITTING:
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    last = max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs - 1
    return last and not runs_at_fit_end


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


def sensitivity_perturbations(budget: OverheadBudget, running: float, unit_seconds: float, configured: int) -> int:
    """How many of ``configured`` ``sensitivity_max`` perturbations fit what the budget has left for a
    pass that has run ``running`` seconds (all of them without a budget; 0: none fits).

    Captum's ``sensitivity_max`` attributes the inputs once more and then once per perturbation, each
    costing ``unit_seconds`` (the pass's measured attribution time).
    """
    if budget.max_overhead is None or configured <= 0:
        return max(configured, 0)
    return max(budget.affordable(unit_seconds, configured + 1, minimum=0, running=running) - 1, 0)


def dropped_entry(
    stage: str, epoch: int, step: int, what: str, reason: str, would_cost: Optional[float], **extra: Any
) -> dict[str, Any]:
    """One record of work the budget dropped: where (stage, epoch, step), ``what`` (a whole ``pass``
    or its ``sensitivity_max``), why, and the seconds it would have cost (``None``: not estimated)."""
    return {
        "stage": stage,
        "epoch": int(epoch),
        "step": int(step),
        "what": what,
        "reason": reason,
        "would_cost_seconds": would_cost,
        **extra,
    }
