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

A final pass in fit with a budget is also sized in samples: the fixed samples (in their fixed order,
each prefix balanced over classes, see :func:`~lightning_trust.explain.sample.interleave_classes`) are
explained in chunks of :data:`CHUNK_SAMPLES`; the first chunks, enough to hold one sample of every
class (:func:`minimum_samples`), always run, each further chunk only while one more, at the measured
cost of a chunk so far, fits what is left (:func:`explain_more_samples`).

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
    >>> minimum_samples(classes=10, total=32), minimum_samples(classes=0, total=32), minimum_samples(2, 5)
    (16, 8, 5)
    >>> explain_more_samples(budget, running=1.0, chunk_seconds=3.9), explain_more_samples(budget, 1.0, 4.1)
    (True, False)
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.trainer.states import TrainerFn

from lightning_trust.core.budget import OverheadBudget
from lightning_trust.explain.methods import METHODS

__all__ = [
    "CHUNK_SAMPLES",
    "admits_pass",
    "allows_pass",
    "dropped_entry",
    "explain_more_samples",
    "is_final_pass",
    "minimum_samples",
    "sensitivity_perturbations",
]

#: Samples per chunk of a final pass sized to the budget (a Captum call each): the unit of its sizing.
CHUNK_SAMPLES = 8


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


def final_share(cb: Any) -> float:
    """The final pass's expected cost in passes: one, plus ``sensitivity_max`` (an attribution per
    perturbation) when it is deferred to the end and computed (float inputs, not a layer method)."""
    plan = cb._plan
    quality = plan is not None and not plan.token and not METHODS[plan.method].layer
    deferred = cb.sensitivity_at == "end" and quality
    return 1.0 + (cb.sensitivity_samples if deferred else 0)


def admits_pass(cb: Any, trainer: Any, final: bool) -> bool:
    """Whether :class:`~lightning_trust.explain.Attribution` ``cb``'s due pass runs (:func:`allows_pass`
    with its plan's estimate, the final pass's share kept, the fit's share done by epochs)."""
    max_epochs = getattr(trainer, "max_epochs", None) or 0
    done = (int(trainer.current_epoch) + 1) / max_epochs if max_epochs > 0 else 1.0
    estimate = getattr(cb._plan, "pass_estimate", None)
    return allows_pass(cb.budget, estimate, final, reserve=final_share(cb), fraction_done=done)


def sensitivity_perturbations(budget: OverheadBudget, running: float, unit_seconds: float, configured: int) -> int:
    """How many of ``configured`` ``sensitivity_max`` perturbations fit what the budget has left for a
    pass that has run ``running`` seconds (all of them without a budget; 0: none fits).

    Captum's ``sensitivity_max`` attributes the inputs once more and then once per perturbation, each
    costing ``unit_seconds`` (the pass's measured attribution time).
    """
    if budget.max_overhead is None or configured <= 0:
        return max(configured, 0)
    return max(budget.affordable(unit_seconds, configured + 1, minimum=0, running=running) - 1, 0)


def minimum_samples(classes: int, total: int, chunk: int = CHUNK_SAMPLES) -> int:
    """The samples a final pass always explains: whole chunks holding at least one sample per class
    (``classes``: those of the stratified sample, 0 when not stratified by class), one chunk at least,
    at most ``total``."""
    chunks = max(1, -(-max(classes, 0) // chunk))
    return min(total, chunks * chunk)


def explain_more_samples(budget: OverheadBudget, running: float, chunk_seconds: float) -> bool:
    """Whether a final pass that has run ``running`` seconds explains one more chunk, a chunk costing
    ``chunk_seconds`` (the mean of those done: attributions and infidelity): it must fit
    :meth:`~lightning_trust.core.OverheadBudget.allowance` (always without a budget)."""
    return budget.affordable(chunk_seconds, 1, minimum=0, running=running) >= 1


def dropped_entry(
    stage: str, epoch: int, step: int, what: str, reason: str, would_cost: Optional[float], **extra: Any
) -> dict[str, Any]:
    """One record of work the budget dropped: where (stage, epoch, step), ``what`` (a whole ``pass``,
    its last ``samples`` or its ``sensitivity_max``), why, and the seconds it would have cost (``None``: not estimated)."""
    return {
        "stage": stage,
        "epoch": int(epoch),
        "step": int(step),
        "what": what,
        "reason": reason,
        "would_cost_seconds": would_cost,
        **extra,
    }
