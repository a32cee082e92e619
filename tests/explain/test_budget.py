"""Attribution's passes within ``max_overhead`` of the fit's time (core.budget.OverheadBudget)."""

import time

import pytest
import torch

from lightning_trust.core.budget import OverheadBudget
from lightning_trust.demo import TabularMLP
from lightning_trust.explain import Attribution
from lightning_trust.explain.budgeting import allows_pass
from tests.explain.helpers import Synthetic
from tests.support import trainer


def test_a_tiny_budget_runs_the_first_and_the_final_pass_and_reports_the_skipped():
    torch.manual_seed(0)
    cb = Attribution(num_samples=8, infidelity_samples=0, sensitivity_samples=0, max_overhead=1e-9, progress=False)
    trainer(max_epochs=4, callbacks=[cb]).fit(TabularMLP(input_dim=8, hidden_dims=[8]), Synthetic(n=512))
    budget = cb.report()["budget"]
    # every epoch's pass is skipped (epoch 0 by the estimate made at fit start); the last epoch's (the
    # report's: nothing is deferred to fit end, the figures are drawn at report time) always runs
    assert [(h["stage"], h["epoch"]) for h in cb.history] == [("validation_end", 3)]
    assert [s["epoch"] for s in budget["skipped_passes"]] == [0, 1, 2] and budget["skipped"] == 3
    assert {s["what"] for s in budget["skipped_passes"]} == {"pass"}
    assert all(
        "over the overhead budget" in s["reason"] and s["would_cost_seconds"] > 0 for s in budget["skipped_passes"]
    )
    assert budget["runs"] == 1 and len(budget["pass_seconds"]) == 1
    # the minimum (the attributions of the 8 samples) was over what was left: recorded, not hidden
    final = budget["final_pass"]
    assert final["stage"] == "validation_end" and not final["within_budget"]
    assert final["minimum_seconds"] > final["allowance_seconds"] and final["sensitivity"] is None
    assert budget["first_pass_estimate"] > 0 and budget["estimate_seconds"] > 0
    assert budget["seconds"] == pytest.approx(sum(budget["pass_seconds"]))
    assert budget["max_overhead"] == 1e-9 and budget["overhead"] > 0
    assert cb.state_dict()["budget"]["runs"] == 1 and cb.state_dict()["skipped"] == budget["skipped_passes"]
    restored = Attribution()
    restored.load_state_dict(cb.state_dict())
    assert restored.budget.runs == 1 and restored.budget.skipped == 3
    assert restored.report()["budget"]["skipped_passes"] == budget["skipped_passes"]


def test_allows_pass_budgets_the_first_pass_by_its_estimate_and_keeps_room_for_the_final_one():
    now = [0.0]
    budget = OverheadBudget(0.05, clock=lambda: now[0])
    budget.start()
    now[0] = 10.0  # 5% of 10 s: 0.5 s
    assert allows_pass(budget, estimate=None)  # no estimate (perturbation methods, causal LMs): it runs
    assert not allows_pass(budget, estimate=0.6) and budget.skipped == 1
    assert allows_pass(budget, estimate=0.4)
    # a final pass follows: 0.4 s now and 0.4 s kept must fit 5% of the projected fit (10 s at 1/4 done: 40 s)
    assert allows_pass(budget, estimate=0.4, reserve=1.0, fraction_done=0.25)
    assert not allows_pass(budget, estimate=0.4, reserve=1.0, fraction_done=1.0) and budget.skipped == 2
    # a final pass that also computes sensitivity_max over 5 perturbations: 0.4 s + 6 x 0.4 s kept > 2 s (5% of 40 s)
    assert not allows_pass(budget, estimate=0.4, reserve=6.0, fraction_done=0.25) and budget.skipped == 3
    assert allows_pass(budget, estimate=0.4, reserve=6.0, fraction_done=0.05)
    assert allows_pass(budget, estimate=99.0, final=True) and budget.skipped == 3  # the final pass always runs
    with budget.timed():
        now[0] = 10.2  # a measured pass replaces the estimate
    assert allows_pass(budget, estimate=99.0)


class SlowMLP(TabularMLP):
    """Every forward takes 2 ms per row: a model whose attribution pass is costly next to its epochs."""

    def forward(self, x):
        time.sleep(2e-3 * len(x))
        return super().forward(x)


def test_the_first_pass_is_skipped_when_its_estimate_does_not_fit():
    torch.manual_seed(0)
    cb = Attribution(num_samples=8, infidelity_samples=0, sensitivity_samples=0, figures="never", progress=False)
    trainer(max_epochs=3, callbacks=[cb]).fit(SlowMLP(input_dim=8, hidden_dims=[8]), Synthetic(n=256))
    budget = cb.report()["budget"]
    # 8 samples x 50 steps x 2 ms: at least 0.8 s, over 5% of the first epochs (256 rows x 2 ms each)
    assert 0.8 <= budget["first_pass_estimate"] < 8.0
    assert [s["epoch"] for s in budget["skipped_passes"]] == [0, 1] and budget["skipped"] == 2
    # nothing deferred to fit end (no figures, no sensitivity): the last epoch's pass is the final one
    assert [(h["stage"], h["epoch"]) for h in cb.history] == [("validation_end", 2)] and budget["runs"] == 1
    assert budget["pass_seconds"][0] >= 0.8  # the estimate was right about the pass it skipped


def test_without_a_budget_every_due_pass_runs():
    torch.manual_seed(0)
    cb = Attribution(num_samples=8, infidelity_samples=0, sensitivity_samples=0, figures="never", max_overhead=None)
    trainer(max_epochs=3, callbacks=[cb]).fit(TabularMLP(input_dim=8, hidden_dims=[8]), Synthetic(n=512))
    assert [h["epoch"] for h in cb.history] == [0, 1, 2] and cb.report()["budget"]["skipped"] == 0


@pytest.mark.slow
def test_measured_overhead_stays_under_max_overhead_on_the_adult_demo(adult):
    """The Adult demo with the defaults: the overhead of every pass but the final one (which always runs,
    documented) stays within 5% of the fit's own time, measured by a clock outside the callback."""
    torch.manual_seed(0)
    cb = Attribution(progress=False)  # the defaults: max_overhead=0.05
    start = time.perf_counter()
    trainer(max_epochs=6, callbacks=[cb]).fit(TabularMLP(), adult)
    wall = time.perf_counter() - start
    budget = cb.report()["budget"]
    fit_seconds = wall - budget["seconds"]  # the fit without the callback's passes
    assert budget["runs"] + budget["skipped"] == 7  # 6 validation ends + the final pass at fit end
    assert [h["stage"] for h in cb.history][-1] == "fit_end"
    before_final = budget["seconds"] - budget["pass_seconds"][-1]
    # a pass is admitted on its estimated cost; one slower than estimated may overshoot by that one pass
    slowest = max(budget["pass_seconds"][:-1], default=0.0)
    assert before_final <= 0.05 * fit_seconds + slowest, (before_final, fit_seconds, budget)
    # the callback's own clock agrees with one outside it (the Trainer's setup before fit start differs)
    assert budget["overhead"] == pytest.approx(budget["seconds"] / fit_seconds, rel=0.15)
