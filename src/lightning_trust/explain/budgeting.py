"""How :class:`~lightning_trust.explain.Attribution` spends its overhead budget
(:class:`~lightning_trust.core.OverheadBudget`): which pass is final (always run), and whether the
costly part of a pass (``sensitivity_max``) still fits.

Example:
    >>> from lightning_trust.core import OverheadBudget
    >>> now = [0.0]
    >>> budget = OverheadBudget(0.05, clock=lambda: now[0])
    >>> budget.start(); now[0] = 100.0
    >>> fits_budget(budget, running=1.0, expected=3.0), fits_budget(budget, running=1.0, expected=6.0)
    (True, False)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from lightning_trust.core.budget import OverheadBudget

__all__ = ["fits_budget", "is_final_pass"]


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
