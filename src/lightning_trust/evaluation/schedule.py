"""When :class:`~lightning_trust.evaluation.CrossDomainEvaluation` evaluates, and when its extra
passes (corrupted copies, extra domains) run within the overhead budget, on how many batches.

A pass during fit runs its extra passes when the budget affords each source's minimum (one batch
and 64 samples, at the rate the last extra pass measured) now and as much again for the final pass
(:func:`~lightning_trust.core.sizing.affords_pass`), then sizes them while they run
(:class:`~lightning_trust.evaluation.extra_passes.BatchLimit`); the final pass always runs. Before
any rate is measured (a fit's first passes; a resumed fit keeps the rate) only the final pass runs
them: the stage's own forward does not price them (corrupting and one metric update per corrupted
domain cost several times the forwards on the digits demo), and one pass of a suite can cost
several epochs of a small model.

Example:
    >>> class Fit:  # a Trainer in the 2nd of 3 epochs, no step limit
    ...     current_epoch, max_epochs, max_steps, global_step, sanity_checking = 1, 3, -1, 20, False
    >>> last_epoch(Fit()), selected(Fit(), every_n_epochs=2)
    (False, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from lightning_trust.core.budget import OverheadBudget
from lightning_trust.core.sizing import MIN_SAMPLES, PassSizer, affords_pass, fraction_done

__all__ = ["ExtraPassBudget", "evaluates", "extra_due", "last_epoch", "selected"]


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


def extra_due(budget: OverheadBudget, trainer: Any, unit_seconds: Optional[float] = None, minimum: int = 1) -> bool:
    """Whether this pass runs the extra passes: outside fit, without a budget and at the last epoch
    always; else when a rate has been measured (``unit_seconds`` a sample) and the budget affords
    ``minimum`` samples now and as many for the final pass. One decision for every process (broadcast
    from rank zero: a skipped pass makes no collective)."""
    if trainer.state.fn != TrainerFn.FITTING:
        return True
    final = last_epoch(trainer) or budget.max_overhead is None
    allowed = final or (
        unit_seconds is not None and affords_pass(budget, unit_seconds, minimum, fraction_done(trainer))
    )
    allowed = bool(trainer.strategy.broadcast(allowed, src=0))
    if not allowed:
        budget.skipped += 1  # on every process, as rank zero decided
    return allowed


class ExtraPassBudget:
    """The extra passes' account: the :class:`~lightning_trust.core.budget.OverheadBudget`, each timed
    pass's seconds and the cost of a sample in the last one (the rate the next decision uses)."""

    def __init__(self, max_overhead: Optional[float]) -> None:
        self.budget = OverheadBudget(max_overhead)
        self.pass_seconds: list[float] = []
        self.unit_seconds: Optional[float] = None

    def due(self, trainer: Any, sources: int) -> bool:
        """Whether this pass runs its extra passes (see :func:`extra_due`), at the rate of the last one."""
        return extra_due(self.budget, trainer, self.unit_seconds, MIN_SAMPLES * max(sources, 1))

    @contextmanager
    def timed(self, trainer: Any) -> Iterator[PassSizer]:
        """Time the extra passes during fit and yield the sizer that cuts them to the budget (outside
        fit: no timing, every batch)."""
        if trainer.state.fn != TrainerFn.FITTING:
            yield PassSizer(self.budget, enabled=False)
            return
        before = self.budget.spent
        with self.budget.timed():
            yield PassSizer(self.budget, final=last_epoch(trainer), fraction_done=fraction_done(trainer))
        self.pass_seconds.append(self.budget.spent - before)

    def measured(self, samples: int) -> None:
        """The samples the last timed pass evaluated (its rate prices the next decision)."""
        if samples > 0 and self.pass_seconds:
            self.unit_seconds = self.pass_seconds[-1] / samples

    def account(self) -> dict[str, Any]:
        return {**self.budget.summary(), "pass_seconds": list(self.pass_seconds)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.state_dict(),
            "pass_seconds": self.pass_seconds,
            "unit_seconds": self.unit_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "budget" in state:
            self.budget.load_state_dict(state["budget"])
        self.pass_seconds = list(state.get("pass_seconds", []))
        self.unit_seconds = state.get("unit_seconds")
