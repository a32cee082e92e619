"""When :class:`~lightning_trust.evaluation.CrossDomainEvaluation` evaluates, and when its extra
passes (corrupted copies, extra domains) run within the overhead budget.

Example:
    >>> class Fit:  # a Trainer in the 2nd of 3 epochs, no step limit
    ...     current_epoch, max_epochs, max_steps, global_step, sanity_checking = 1, 3, -1, 20, False
    >>> last_epoch(Fit()), selected(Fit(), every_n_epochs=2)
    (False, True)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from lightning_trust.core.budget import OverheadBudget

__all__ = ["evaluates", "extra_due", "last_epoch", "selected"]


def last_epoch(trainer: Any) -> bool:
    """Whether the current epoch is the fit's last (``max_epochs`` or ``max_steps`` reached)."""
    steps_done = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    return steps_done or (trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs)


def selected(trainer: Any, every_n_epochs: int) -> bool:
    """Whether a validation pass during fit is evaluated: every ``every_n_epochs``-th epoch and the
    last one, never the sanity check."""
    epoch = trainer.current_epoch + 1
    return not trainer.sanity_checking and (epoch % every_n_epochs == 0 or last_epoch(trainer))


def evaluates(trainer: Any, stage: RunningStage, every_n_epochs: int) -> bool:
    """The one skip rule: always at test and in a standalone ``trainer.validate``; during fit, the
    validation epochs :func:`selected` picks."""
    if stage == RunningStage.TESTING or trainer.state.fn == TrainerFn.VALIDATING:
        return True
    return selected(trainer, every_n_epochs)


def extra_due(budget: OverheadBudget, trainer: Any) -> bool:
    """Whether this pass runs the extra passes: outside fit always; during fit when the budget allows
    (the last epoch's always), one decision for every process (a skipped pass makes no collective)."""
    if trainer.state.fn != TrainerFn.FITTING:
        return True
    return bool(trainer.strategy.broadcast(budget.allows(final=last_epoch(trainer)), src=0))
