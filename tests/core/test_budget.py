"""The overhead budget: decisions, the skipped count, the account across a checkpoint."""

from __future__ import annotations

import pytest

from lightning_trust.core.budget import OverheadBudget, check_max_overhead


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_passes_are_spaced_to_stay_within_the_budget() -> None:
    clock = Clock()
    budget = OverheadBudget(0.1, clock=clock)
    budget.start()
    ran = 0
    for epoch in range(100):  # one second of training per epoch, a pass of 0.5 s due after each
        clock.now += 1.0
        if budget.allows(final=epoch == 99):
            with budget.timed():
                clock.now += 0.5
            ran += 1
    assert budget.runs == ran and budget.skipped == 100 - ran
    # the final pass may overshoot by one pass at most
    assert budget.spent <= 0.1 * budget.fit_seconds() + 0.5
    assert budget.overhead() == pytest.approx(budget.spent / (budget.elapsed() - budget.spent))
    assert 15 <= ran <= 22  # ~ 0.1 * 100 s / 0.5 s = 20 passes


def test_no_budget_runs_every_pass_and_still_measures() -> None:
    clock = Clock()
    budget = OverheadBudget(None, clock=clock)
    budget.start()
    for _ in range(5):
        clock.now += 0.1
        assert budget.allows()
        with budget.timed():
            clock.now += 1.0
    assert budget.summary() == {"max_overhead": None, "overhead": pytest.approx(10.0), "runs": 5, "skipped": 0,
                                "seconds": pytest.approx(5.0)}  # fmt: skip


def test_the_account_survives_a_checkpoint() -> None:
    clock = Clock()
    first = OverheadBudget(0.05, clock=clock)
    first.start()
    clock.now = 20.0
    with first.timed():
        clock.now = 21.0
    clock.now = 30.0
    state = first.state_dict()
    resumed = OverheadBudget(0.05, clock=clock)
    resumed.load_state_dict(state)
    clock.now = 100.0  # a new process: its clock starts anywhere
    resumed.start()
    assert resumed.elapsed() == pytest.approx(30.0) and resumed.spent == pytest.approx(1.0) and resumed.runs == 1
    clock.now = 110.0
    assert resumed.fit_seconds() == pytest.approx(39.0)


@pytest.mark.parametrize("value", [0, -0.1, "5%", True, float("nan")])
def test_bad_budgets_are_refused_with_the_fix(value: object) -> None:
    with pytest.raises(ValueError, match=r"max_overhead.*0\.05 = 5%"):
        check_max_overhead(value)  # type: ignore[arg-type]
