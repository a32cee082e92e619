"""AdversarialRobustness within its overhead budget: the sizing rule (core.sizing), a pass cut to the
budget equal to Captum on the same samples, the budget across a checkpoint, figures drawn for the report.

The budget's clock is injected: it advances by a fixed cost per model row evaluated, so that every
decision is a rule on numbers, never on the machine's speed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM
from scipy.stats import binomtest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.budget import OverheadBudget
from lightning_trust.core.intervals import wilson_interval
from lightning_trust.core.sizing import HEADROOM, MIN_SAMPLES, PassSizer, affords_pass, fraction_done
from lightning_trust.demo import TabularMLP
from lightning_trust.explain import AdversarialRobustness
from lightning_trust.explain.robustness_inputs import draw_attack_sample
from lightning_trust.explain.robustness_pass import attack_order
from tests.explain.helpers import Synthetic
from tests.support import trainer

ROW_SECONDS = 1e-3  # the fake clock's cost of one model row


def _clocked(model: nn.Module, now: list[float]) -> None:
    model.register_forward_hook(lambda _m, args, _o: now.__setitem__(0, now[0] + ROW_SECONDS * len(args[0])))


def _prepared(now, samples=256, **kwargs):
    torch.manual_seed(0)
    model = TabularMLP(input_dim=8, hidden_dims=[16]).eval()
    x, y = torch.randn(512, 8), torch.randint(0, 2, (512,))
    cb = AdversarialRobustness(num_samples=samples, progress=False, figures="never", **kwargs)
    cb.budget.clock = lambda: now[0]
    cb.sample = draw_attack_sample(DataLoader(TensorDataset(x, y), batch_size=64), BatchContract(), samples, seed=0)
    cb._prepare(None, model)
    _clocked(model, now)
    return cb, model


def test_attack_order_interleaves_the_classes_so_a_prefix_is_balanced():
    targets = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)  # sorted by class, as the drawn sample is
    order = attack_order(targets, stratified=True, seed=0)
    assert sorted(order.tolist()) == list(range(12))
    assert targets[order[:6]].bincount().tolist() == [2, 2, 2]
    shuffled = attack_order(torch.zeros(10, 4, dtype=torch.long), stratified=True, seed=1)  # token labels
    assert sorted(shuffled.tolist()) == list(range(10))


def test_the_sizing_rule():
    now = [0.0]
    budget = OverheadBudget(0.05, clock=lambda: now[0])
    budget.start()
    now[0] = 10.0  # 10 s of fit: 0.5 s to spend
    sizer = PassSizer(budget, final=True)
    now[0] += 0.1  # the first 64 of 1024 units took 0.1 s: 0.4 s left at 1.5625 ms a unit, 90% of it planned
    assert (
        sizer.count(done=64, total=1024, minimum=64)
        == 64 + 230
        == 64 + math.floor(HEADROOM * budget.allowance(running=0.1) / (0.1 / 64))
    )
    assert sizer.count(done=64, total=200, minimum=64) == 200  # never more than there is
    now[0] += 10.0  # a slow first unit: the final pass still does its minimum
    assert sizer.count(done=16, total=256, minimum=64) == 64
    # a pass that is not final keeps the final pass's minimum (at the measured rate) within the projected fit
    now[0], budget = 0.0, OverheadBudget(0.05, clock=lambda: now[0])
    budget.start()
    now[0] = 10.0
    with budget.timed():  # an earlier pass spent 0.4 of the 0.5 s
        now[0] += 0.4
    for done, expected in ((0.5, 60), (1.0, 32)):  # halfway: 90% of 0.05 s fits 28 more; at the end the 0.1 s kept
        early = PassSizer(budget, final=False, fraction_done=done, reserve_units=64)
        now[0] += 0.05  # its first 32 units
        assert early.count(done=32, total=256) == expected
        now[0] -= 0.05
    # 64 ms fits the 0.1 s left now; with 64 ms kept for the final pass, only within the projected fit (20 s)
    assert affords_pass(budget, unit_seconds=1e-3, minimum=64, fraction_done=0.5)
    assert not affords_pass(budget, unit_seconds=1e-3, minimum=64, fraction_done=1.0)
    assert not affords_pass(budget, unit_seconds=2e-3, minimum=64, fraction_done=0.5)  # 128 ms > 0.1 s
    assert affords_pass(budget, unit_seconds=1.0, minimum=64, final=True)  # the final pass always runs
    assert PassSizer(OverheadBudget(None), final=True).count(1, 99) == 99  # no budget: everything

    class Fit:
        current_epoch, max_epochs, global_step, max_steps = 1, 4, 10, -1

    assert fraction_done(Fit()) == 0.5


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_a_pass_cut_to_the_budget_equals_captum_on_the_same_samples(attack):
    now = [0.0]
    cb, model = _prepared(now, attacks=[attack], epsilons=[0.0, 0.3], pgd_steps=3)
    cb.budget.start()
    now[0] = 10.0  # 5% of 10 s
    result = cb.evaluate(model, sizer=PassSizer(cb.budget, final=True))
    # the first chunk (64 samples) costs rows x forwards: clean, then the attack's forwards, then the scoring
    forwards = 1 + (1 if attack == "fgsm" else 3) + 1
    first = MIN_SAMPLES * forwards * ROW_SECONDS
    expected = MIN_SAMPLES + math.floor(HEADROOM * (0.05 * 10.0 - first) / (first / MIN_SAMPLES) + 1e-9)
    assert result["samples"] == expected < 256 and result["truncated"] and result["samples_available"] == 256
    # the same samples, attacked by Captum directly
    index = cb.order[:expected]
    x, y = cb.sample.inputs[index], cb.sample.targets[index]
    low, high = float(cb.sample.inputs.min()), float(cb.sample.inputs.max())

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="none")

    if attack == "fgsm":
        adv = FGSM(model, loss_func=loss, lower_bound=low, upper_bound=high).perturb(x.clone(), 0.3, y)
    else:
        from captum.robust import PGD

        adv = PGD(model, loss_func=loss, lower_bound=low, upper_bound=high).perturb(x.clone(), 0.3, 2.5 * 0.3 / 3, 3, y)
    with torch.no_grad():
        clean, right = model(x).argmax(1) == y, model(adv).argmax(1) == y
    assert result["clean_accuracy"] == pytest.approx(clean.float().mean().item())
    assert result["robust_accuracy"][attack]["0.3"] == pytest.approx(right.float().mean().item())
    assert result["robust_accuracy"][attack]["0"] == result["clean_accuracy"]
    flipped = (clean & ~right).sum().item() / clean.sum().item()
    assert result["attack_success_rate"][attack]["0.3"] == pytest.approx(flipped)
    # each number's 95% Wilson interval, as scipy computes it
    interval = result["intervals"]["robust_accuracy"][attack]["0.3"]
    reference = binomtest(int(right.sum()), expected).proportion_ci(method="wilson")
    assert interval == pytest.approx([reference.low, reference.high])
    assert result["intervals"]["clean_accuracy"] == wilson_interval(int(clean.sum()), expected)


def test_without_a_budget_or_outside_fit_the_whole_sample_is_attacked():
    now = [0.0]
    cb, model = _prepared(now, samples=100, attacks=["fgsm"], epsilons=[0.1], max_overhead=None)
    cb.budget.start()
    now[0] = 1.0  # a budget of 5% would afford 0.05 s, a tenth of the pass
    assert cb.evaluate(model, sizer=PassSizer(cb.budget, final=True))["samples"] == 100
    cb2, model2 = _prepared(now, samples=100, attacks=["fgsm"], epsilons=[0.1])
    result = cb2.evaluate(model2)  # called by hand (or at test): no sizer, every sample
    assert result["samples"] == 100 and not result["truncated"]


def test_the_budget_and_the_rate_survive_a_checkpoint_and_figures_wait_for_the_report(tmp_path):
    torch.manual_seed(0)
    cb = AdversarialRobustness(attacks=["fgsm"], epsilons=[0.0, 0.2], num_samples=64, progress=False)
    trainer(tmp_path, [cb], max_epochs=2).fit(TabularMLP(input_dim=8, hidden_dims=[8]), Synthetic(n=256))
    figure = cb.folder(None) / "robust_accuracy.png"
    assert not figure.exists()  # nothing drawn during fit
    state = cb.state_dict()
    assert state["budget"]["runs"] == cb.budget.runs >= 1 and state["unit_seconds"] > 0
    restored = AdversarialRobustness()
    restored.load_state_dict(state)
    assert restored.budget.runs == cb.budget.runs and restored.budget.spent == cb.budget.spent
    assert restored._unit_seconds == cb._unit_seconds and restored.last == cb.last
    report = cb.report()  # the report (TrustReport reads it) draws the figure owed
    assert figure.is_file() and report["figures"] == {"robust_accuracy": str(figure)}
    assert report["samples"] == report["samples_available"] == 64 and report["truncated"] is False
    assert len(report["intervals"]["robust_accuracy"]["fgsm"]) == 2
