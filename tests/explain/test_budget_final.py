"""Attribution's final pass sized to the overhead budget (sensitivity_max perturbations that fit, the
minimum always computed, everything dropped reported), and its figures drawn when the report is read."""

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from captum.metrics import sensitivity_max
from lightning.pytorch.callbacks import Callback

from lightning_trust.core import OverheadBudget
from lightning_trust.demo import SmallCNN, TabularMLP
from lightning_trust.explain import Attribution, plots
from lightning_trust.explain.account import PassAccount
from lightning_trust.explain.budgeting import sensitivity_perturbations
from lightning_trust.report import TrustReport, load_card
from tests.explain.helpers import DigitsSubset, StubTrainer, Synthetic
from tests.foundation.models import build
from tests.support import trainer


def _clock(start=100.0):
    now = [0.0]
    budget = OverheadBudget(0.05, clock=lambda: now[0])
    budget.start()
    now[0] = start
    return budget, now


def test_sensitivity_perturbations_are_those_that_fit_what_is_left():
    budget, now = _clock()  # 100 s of fit: 5 s to spend
    # sensitivity_max attributes once more, then once per perturbation: (k + 1) x 1 s must fit 5 s
    assert sensitivity_perturbations(budget, running=0.0, unit_seconds=1.0, configured=10) == 4
    assert sensitivity_perturbations(budget, running=0.0, unit_seconds=1.0, configured=3) == 3  # all fit
    # the running pass's 2 s count as spent, not as fit: 0.05 x 98 - 2 = 2.9 s left: 1 + 1 attributions
    assert sensitivity_perturbations(budget, running=2.0, unit_seconds=1.0, configured=5) == 1
    assert sensitivity_perturbations(budget, running=0.0, unit_seconds=6.0, configured=5) == 0  # none fits
    with budget.timed():
        now[0] = 104.9  # 4.9 s spent by a pass: 0.05 x 100 - 4.9 = 0.1 s left
    assert sensitivity_perturbations(budget, running=0.0, unit_seconds=0.04, configured=5) == 1
    unlimited = OverheadBudget(None)
    assert sensitivity_perturbations(unlimited, running=0.0, unit_seconds=99.0, configured=5) == 5
    assert budget.allowance(running=0.0) == pytest.approx(0.1) and budget.allowance(running=1.0) == 0.0


def test_the_account_runs_everything_outside_fit_and_records_what_a_final_pass_drops():
    budget, now = _clock()
    account = PassAccount(budget)
    account.begin(final=True, in_fit=False)  # a manual explain or a test: no budget clock
    assert account.sensitivity_count(unit_seconds=50.0, configured=5) == 5
    account.begin(final=True, in_fit=True)
    now[0] += 1.0
    assert account.sensitivity_count(unit_seconds=3.0, configured=5) == 0  # 4 s left < 2 attributions

    class Result:
        stage, epoch, step, sensitivity_max = "fit_end", 3, 40, None

    account.record_sensitivity(Result())
    (entry,) = account.skipped
    assert entry["what"] == "sensitivity_max" and entry["epoch"] == 3 and entry["step"] == 40
    assert entry["would_cost_seconds"] == pytest.approx(18.0) and "4 s were left" in entry["reason"]
    account.end(Result(), "fit_end", seconds=1.2, num_samples=32)  # its minimum fit: no warning
    assert account.final["allowance_seconds"] == 5.0 and account.final["minimum_seconds"] == 1.0
    assert account.final["sensitivity"]["ran"] == 0 and account.pass_seconds == [1.2]
    # a final pass whose minimum alone is over what was left: recorded and warned about
    account.begin(final=True, in_fit=True)
    left = budget.allowance()
    now[0] += 9.0
    with pytest.warns(UserWarning, match=r"needed 9 s for its minimum \(the attributions of the 32 fixed samples"):
        account.end(Result(), "fit_end", seconds=9.0, num_samples=32)
    assert account.final["minimum_seconds"] == 9.0 and account.final["allowance_seconds"] == left


class Sized(Attribution):
    """Each attribution of the sample counted as 1 s of the budget's (fake) clock."""

    def sensitivity_count(self, unit_seconds, configured):
        return self.account.sensitivity_count(1.0, configured)


def test_a_partial_sensitivity_max_equals_captum_over_its_perturbations_and_is_kept_out_of_the_headline(digits):
    torch.manual_seed(0)
    cnn = SmallCNN(channels=[8, 16]).eval()
    cb = Sized(method="saliency", num_samples=8, infidelity_samples=0, sensitivity_samples=5, seed=5, progress=False)
    budget, _ = _clock(80.0)  # 4 s left: 1 + 3 attributions of 1 s fit, 3 of 5 perturbations
    cb.budget = cb.account.budget = budget
    cb.account.begin(final=True, in_fit=True)
    result = cb.explain(cnn, StubTrainer(DigitsSubset(digits)), stage="fit_end")
    x, t = cb.sample.inputs, result.targets
    torch.manual_seed(5)
    np.random.seed(5)
    Saliency(cnn).attribute(x, target=t)  # consumes no random numbers; kept for the same call order
    expected = sensitivity_max(Saliency(cnn).attribute, x, perturb_radius=0.02, n_perturb_samples=3, target=t)
    (entry,) = cb.report()["budget"]["skipped_passes"]
    assert (entry["what"], entry["ran"], entry["configured"]) == ("sensitivity_max", 3, 5)
    assert entry["lower_bound"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert entry["would_cost_seconds"] == pytest.approx(2.0) and "lower bound" in entry["reason"]
    # the configured number (the max over 5) was not measured: null, and no standard can meet it
    assert result.sensitivity_max is None and cb.report()["sensitivity_max"] is None
    assert cb.history[-1]["sensitivity_max"] is None


class FitEnd(Callback):
    """Records when the fit's last hook ran (put it after the callbacks it watches)."""

    ended = False

    def on_fit_end(self, trainer, pl_module):
        self.ended = True


def _watch_drawing(monkeypatch, marker):
    calls = []
    draw = plots.draw_explanation

    def watched(*args, **kwargs):
        calls.append(marker.ended)
        return draw(*args, **kwargs)

    monkeypatch.setattr(plots, "draw_explanation", watched)
    return calls


def test_figures_are_drawn_once_when_the_report_is_read_not_during_fit(tmp_path, monkeypatch):
    torch.manual_seed(0)
    marker = FitEnd()
    calls = _watch_drawing(monkeypatch, marker)
    cb = Attribution(num_samples=8, infidelity_samples=2, sensitivity_samples=0, progress=False)
    trainer(tmp_path, [cb, marker], max_epochs=2).fit(TabularMLP(input_dim=8, hidden_dims=[8]), Synthetic(n=512))
    folder = tmp_path / "lightning_trust" / "explain"
    assert calls == [] and not (folder / "feature_importance.png").exists()  # nothing drawn in fit
    assert (folder / "importance.csv").is_file()  # the files are written by the pass
    report = cb.report()
    assert calls == [True] and set(report["figures"]) == {"feature_importance"}
    assert (folder / "feature_importance.png").is_file() and report["budget"]["figure_seconds"] > 0
    assert cb.report()["figures"] == report["figures"] and calls == [True]  # drawn once, then cached
    assert report["budget"]["seconds"] == pytest.approx(sum(report["budget"]["pass_seconds"]))


@pytest.mark.parametrize(
    ("model", "figures"),
    [
        ("bert", {"explain.token_heatmap", "explain.tokens_html", "explain.feature_importance"}),
        ("vit", {"explain.patch_heatmap", "explain.heatmaps", "explain.feature_importance"}),
    ],
)
def test_the_card_shows_the_token_and_patch_heatmaps_drawn_after_the_fit(tmp_path, monkeypatch, model, figures):
    torch.manual_seed(0)
    module, dm = build(model)
    marker = FitEnd()
    calls = _watch_drawing(monkeypatch, marker)
    cb = Attribution(num_samples=4, method_kwargs={"n_steps": 8}, infidelity_samples=0, sensitivity_samples=0,
                     progress=False)  # fmt: skip
    report = TrustReport(verbose=False)
    trainer(tmp_path, [cb, marker, report], max_epochs=1, limit_train_batches=2).fit(module, dm)
    card = load_card(report.paths["json"])
    keys = {f["key"] for f in card["figures"]}
    assert figures <= keys and all(f["data"] for f in card["figures"] if f["key"].startswith("explain."))
    assert calls == [True]  # once, by the card (after the fit's last hook)


@pytest.mark.slow
def test_the_overhead_stays_within_max_overhead_on_the_adult_demo_by_the_budgets_own_account(adult):
    torch.manual_seed(0)
    cb = Attribution(progress=False)  # the defaults: max_overhead=0.05, sensitivity_max deferred to the end
    trainer(max_epochs=4, callbacks=[cb]).fit(TabularMLP(), adult)
    budget = cb.report()["budget"]
    final, fit = budget["final_pass"], budget["seconds"] / budget["overhead"]
    assert final["stage"] == "fit_end" and final["minimum_seconds"] <= final["allowance_seconds"]
    # the final pass ran the sensitivity_max perturbations that fit what was left after its minimum:
    # k + 1 attributions within the allowance, and k + 2 over it unless all ran
    sizing = final["sensitivity"]
    ran, unit, left = sizing["ran"], sizing["unit_seconds"], sizing["allowance_seconds"]
    assert (ran == 0 or (ran + 1) * unit <= left) and (ran == sizing["configured"] or (ran + 2) * unit > left)
    dropped = [s for s in budget["skipped_passes"] if s["what"] == "sensitivity_max"]
    assert bool(dropped) == (ran < sizing["configured"])
    # what the account measured stays within max_overhead, up to the estimate errors the rule allows:
    # one non-final pass admitted on its expected cost, and the sized work's measured cost over its estimate
    slowest = max(budget["pass_seconds"][:-1], default=0.0)
    past_estimate = max(final["seconds"] - final["minimum_seconds"] - (ran + 1) * unit, 0.0)
    assert budget["overhead"] <= 0.05 + (slowest + past_estimate) / fit, budget
    assert final["within_budget"] == (budget["overhead"] <= 0.05)
