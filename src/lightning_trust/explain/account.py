"""The budget's account of :class:`~lightning_trust.explain.Attribution`'s passes: the passes run and
their seconds, the work dropped (a whole pass, or ``sensitivity_max`` perturbations: what, why, the
seconds it would have cost), and the final pass against what the budget had left for it.

A final pass in fit with a budget asks :meth:`PassAccount.explain_more` before each chunk of samples
after its minimum (:func:`~lightning_trust.explain.budgeting.explain_more_samples`, a chunk's cost
measured from those done on the budget's clock); the chunks it drops are recorded (``what="samples"``)
and every aggregate number of the pass is over the samples explained.

A pass asks :meth:`PassAccount.sensitivity_count` how many ``sensitivity_max`` perturbations fit
(:func:`~lightning_trust.explain.budgeting.sensitivity_perturbations`); fewer than configured is
recorded, and a ``sensitivity_max`` over fewer perturbations (a lower bound of the configured one) is
moved out of the headline number into that record. A final pass whose minimum (the attributions of
the fixed samples) alone exceeds what was left is recorded and warned about once.

Example:
    >>> from lightning_trust.core import OverheadBudget
    >>> now = [0.0]
    >>> account = PassAccount(OverheadBudget(0.05, clock=lambda: now[0]))
    >>> account.budget.start(); now[0] = 100.0
    >>> account.begin(final=True, in_fit=True); now[0] = 101.0  # 1 s into the final pass: 4 s left
    >>> account.sensitivity_count(unit_seconds=1.2, configured=5)
    2
    >>> account.sizing["allowance_seconds"], account.sizing["minimum_seconds"]
    (4.0, 1.0)
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_trust.core.budget import OverheadBudget
from lightning_trust.core.output import warn_once
from lightning_trust.explain.budgeting import dropped_entry, explain_more_samples, sensitivity_perturbations

__all__ = ["PassAccount"]


def _s(seconds: float) -> str:
    return f"{seconds:.3g} s"


class PassAccount:
    """What the passes of one callback cost and what its budget dropped (see the module docstring)."""

    def __init__(self, budget: OverheadBudget) -> None:
        self.budget = budget
        self.skipped: list[dict[str, Any]] = []  # the work the budget dropped, in order
        self.pass_seconds: list[float] = []  # each pass's time in this fit, files (and figures drawn in fit) included
        self.final: Optional[dict[str, Any]] = None  # the final pass against its allowance
        self.sizing: Optional[dict[str, Any]] = None  # this pass's sensitivity_max sizing
        self.samples: Optional[dict[str, Any]] = None  # this pass's sizing in samples (a final pass in fit)
        self._started = 0.0
        self._allowance: Optional[float] = None
        self._in_fit = False
        self._final = False

    # a pass -----------------------------------------------------------------------------------
    def begin(self, final: bool, in_fit: bool) -> None:
        """A pass starts: note what the budget has left for it."""
        self._started, self._final, self._in_fit, self.sizing = self.budget.clock(), final, in_fit, None
        self.samples = None
        limited = in_fit and self.budget.max_overhead is not None
        self._allowance = self.budget.allowance() if limited else None

    def running(self) -> float:
        """Seconds the current pass has run."""
        return self.budget.clock() - self._started

    def sizes_samples(self) -> bool:
        """Whether this pass is sized in samples: a final pass in fit, with a budget."""
        return self._final and self._in_fit and self.budget.max_overhead is not None

    def plan_samples(self, total: int, minimum: int, chunk: int) -> None:
        """This pass explains ``total`` samples in chunks of ``chunk``, the first ``minimum`` always."""
        self.samples = {
            "configured": total, "explained": total, "minimum": minimum, "chunk": chunk,
            "chunk_seconds": None, "allowance_seconds": None, "minimum_seconds": None,
        }  # fmt: skip

    def explain_more(self, done: int) -> bool:
        """Whether the pass explains the samples after its first ``done``: always within its minimum (or
        when it is not sized) and within a chunk (Captum calls of ``batch_size`` < a chunk), then while one
        more chunk fits what is left."""
        plan = self.samples
        if plan is None or done < plan["minimum"] or done % plan["chunk"]:
            return True
        running = self.running()
        if plan["minimum_seconds"] is None:
            plan["minimum_seconds"] = running
        chunk = running * plan["chunk"] / done if done else 0.0
        plan["chunk_seconds"], plan["allowance_seconds"] = chunk, self.budget.allowance(running)
        more = explain_more_samples(self.budget, running, chunk)
        if not more:
            plan["explained"] = done
        return more

    def record_samples(self, result: Any) -> None:
        """Record the chunks of samples the budget dropped from ``result``'s pass."""
        plan = self.samples
        if plan is None or plan["explained"] >= plan["configured"]:
            return
        k, n, chunk, left = plan["explained"], plan["configured"], plan["chunk_seconds"], plan["allowance_seconds"]
        would_cost = (n - k) / plan["chunk"] * chunk
        reason = (
            f"over the overhead budget: {k} of the {n} fixed samples explained (chunks of {plan['chunk']} at "
            f"{_s(chunk)} each, {plan['minimum']} always); the next chunk did not fit the {_s(left)} left within "
            f"max_overhead={self.budget.max_overhead}: every aggregate number is over the first {k} samples"
        )
        self.skipped.append(dropped_entry(
            result.stage, result.epoch, result.step, "samples", reason, would_cost,
            explained=k, configured=n, minimum=plan["minimum"],
        ))  # fmt: skip

    def sensitivity_count(self, unit_seconds: float, configured: int) -> int:
        """The ``sensitivity_max`` perturbations this pass runs: all outside a fit or without a budget,
        else those that fit (one attribution of the sample costing ``unit_seconds``)."""
        running = self.running()
        limited = self._in_fit and self.budget.max_overhead is not None
        count = sensitivity_perturbations(self.budget, running, unit_seconds, configured) if limited else configured
        self.sizing = {
            "configured": configured,
            "ran": count,
            "unit_seconds": unit_seconds,
            "allowance_seconds": self.budget.allowance(running) if limited else None,
            "minimum_seconds": running,
        }
        return count

    def record_sensitivity(self, result: Any) -> None:
        """Record the ``sensitivity_max`` perturbations the budget dropped from ``result``'s pass; a value
        over fewer perturbations than configured leaves ``result.sensitivity_max`` for the record."""
        sizing = self.sizing
        if sizing is None or sizing["ran"] >= sizing["configured"]:
            return
        n, k, unit, left = sizing["configured"], sizing["ran"], sizing["unit_seconds"], sizing["allowance_seconds"]
        budget = f"max_overhead={self.budget.max_overhead}"
        if k == 0:
            reason = (
                f"over the overhead budget: {n} perturbations cost {n + 1} attributions of {_s(unit)}, "
                f"{_s((n + 1) * unit)}; {_s(left)} were left within {budget}"
            )
            entry = dropped_entry(result.stage, result.epoch, result.step, "sensitivity_max", reason, (n + 1) * unit)
        else:
            reason = (
                f"over the overhead budget: {k} of {n} perturbations fit the {_s(left)} left within {budget}; "
                f"the max over {k} (lower_bound) is only a lower bound of the max over {n}"
            )
            entry = dropped_entry(
                result.stage, result.epoch, result.step, "sensitivity_max", reason, (n - k) * unit,
                ran=k, configured=n, lower_bound=result.sensitivity_max,
            )  # fmt: skip
            result.sensitivity_max = None  # the configured number was not measured
        self.skipped.append(entry)

    def end(self, owner: Any, stage: str, seconds: float, num_samples: int) -> None:
        """A pass of ``seconds`` ended; a final one in fit is set against what was left for it."""
        self.pass_seconds.append(seconds)
        if not (self._final and self._in_fit):
            return
        minimum = self.sizing["minimum_seconds"] if self.sizing is not None else seconds
        if self.samples is not None and self.samples["minimum_seconds"] is not None:
            minimum = self.samples["minimum_seconds"]
            num_samples = self.samples["minimum"]
        budget = self.budget
        self.final = {
            "stage": stage,
            "seconds": seconds,
            "allowance_seconds": self._allowance,
            "minimum_seconds": minimum,
            "sensitivity": None if self.sizing is None else dict(self.sizing),
            "samples": None if self.samples is None else dict(self.samples),
            "within_budget": budget.max_overhead is None or budget.overhead() <= budget.max_overhead,
        }
        if self._allowance is not None and minimum > self._allowance:
            warn_once(
                owner,
                "final_minimum",
                f"Attribution's final pass needed {_s(minimum)} for its minimum (the attributions of the "
                f"{num_samples} fixed samples, with the method's configured steps) where {_s(self._allowance)} were "
                f"left within max_overhead={budget.max_overhead}: the measured overhead is {budget.overhead():.1%}. "
                "Lower `num_samples` (or `n_steps` in `method_kwargs`), or raise `max_overhead`.",
            )

    def summary(self, plan: Any, figure_seconds: float) -> dict[str, Any]:
        """The report's ``budget``: the budget's own account, what was dropped, each pass's seconds, the
        first pass's estimate (and what making it cost), the final pass, and the drawing at report time."""
        return {
            **self.budget.summary(),
            "skipped_passes": list(self.skipped),
            "pass_seconds": list(self.pass_seconds),
            "first_pass_estimate": getattr(plan, "pass_estimate", None),
            "estimate_seconds": getattr(plan, "estimate_seconds", None),
            "final_pass": self.final,
            "figure_seconds": figure_seconds,
        }

    def skip_pass(self, stage: str, epoch: int, step: int, expected: Optional[float]) -> None:
        """Record a due pass the budget refused (its expected cost did not fit)."""
        fit = self.budget.fit_seconds()
        cost = "no estimate" if expected is None else f"its expected {_s(expected)}"
        reason = (
            f"over the overhead budget: {cost}, with the final pass's share kept, exceeds "
            f"max_overhead={self.budget.max_overhead} of the fit ({_s(fit)} so far, {_s(self.budget.spent)} spent)"
        )
        self.skipped.append(dropped_entry(stage, epoch, step, "pass", reason, expected))
