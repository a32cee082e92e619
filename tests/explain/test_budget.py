"""Attribution's passes within ``max_overhead`` of the fit's time (core.budget.OverheadBudget)."""

import time

import pytest
import torch

from lightning_trust.demo import TabularMLP
from lightning_trust.explain import Attribution
from tests.explain.helpers import Synthetic
from tests.support import trainer


def test_a_tiny_budget_runs_the_first_and_the_final_pass_and_reports_the_skipped():
    torch.manual_seed(0)
    cb = Attribution(num_samples=8, infidelity_samples=0, sensitivity_samples=0, max_overhead=1e-9, progress=False)
    trainer(max_epochs=4, callbacks=[cb]).fit(TabularMLP(input_dim=8, hidden_dims=[8]), Synthetic(n=512))
    budget = cb.report()["budget"]
    # epoch 0 runs (nothing measured yet), epochs 1-3 are skipped, the fit-end pass (the report's) always runs
    assert [h["stage"] for h in cb.history] == ["validation_end", "fit_end"]
    assert [s["epoch"] for s in budget["skipped_passes"]] == [1, 2, 3] and budget["skipped"] == 3
    assert budget["runs"] == 2 and len(budget["pass_seconds"]) == 2
    assert budget["seconds"] == pytest.approx(sum(budget["pass_seconds"]))
    assert budget["max_overhead"] == 1e-9 and budget["overhead"] > 0
    assert cb.state_dict()["budget"]["runs"] == 2 and cb.state_dict()["skipped"] == budget["skipped_passes"]
    restored = Attribution()
    restored.load_state_dict(cb.state_dict())
    assert restored.budget.runs == 2 and restored.budget.skipped == 3


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
    assert before_final <= 0.05 * fit_seconds, (before_final, fit_seconds, budget)
    assert budget["overhead"] == pytest.approx(budget["seconds"] / fit_seconds, rel=0.05)
