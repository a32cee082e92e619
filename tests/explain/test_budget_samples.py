"""Attribution's final pass sized in samples: chunks of 8 fixed samples (each prefix balanced over
classes) after its minimum, further chunks only while one more fits the budget (a fake clock: each
chunk costs 1 s), the explained prefix equal to Captum, the report and the checkpoint."""

import pytest
import torch
from captum.attr import IntegratedGradients
from lightning.pytorch.callbacks import Callback

from lightning_trust.core import OverheadBudget
from lightning_trust.demo import SmallCNN, TabularMLP
from lightning_trust.explain import Attribution
from lightning_trust.explain.budgeting import explain_more_samples, minimum_samples
from lightning_trust.explain.explanation import rank_correlation
from lightning_trust.explain.sample import interleave_classes
from tests.explain.helpers import DigitsSubset, StubTrainer, Synthetic
from tests.support import trainer


class Chunked(Attribution):
    """Every chunk of samples costs 1 s of the (fake) budget clock ``now``, counted from the pass's start."""

    now = [0.0]
    asked: list = []

    def explain_more(self, done, seconds):
        self.now[0] = self.account._started + done / 8
        self.asked.append(done)
        return super().explain_more(done, seconds)


def _chunked(seconds_of_fit, **kw):
    now = [0.0]
    budget = OverheadBudget(0.05, clock=lambda: now[0])
    budget.start()
    now[0] = seconds_of_fit
    cb = Chunked(num_samples=32, method_kwargs={"n_steps": 8}, infidelity_samples=0, sensitivity_samples=0,
                 figures="never", progress=False, **kw)  # fmt: skip
    cb.now, cb.asked = now, []
    cb.budget = cb.account.budget = budget
    return cb


def test_the_rule_minimum_chunks_then_one_more_while_it_fits():
    assert minimum_samples(classes=10, total=32) == 16  # one sample per class: two chunks of 8
    assert minimum_samples(classes=2, total=32) == minimum_samples(classes=0, total=32) == 8
    assert minimum_samples(classes=10, total=12) == 12 and minimum_samples(3, 32, chunk=4) == 4
    now = [0.0]
    budget = OverheadBudget(0.05, clock=lambda: now[0])
    budget.start()
    now[0] = 62.0  # 60 s of fit and a pass running 2 s: 3 - 2 = 1 s left
    assert explain_more_samples(budget, running=2.0, chunk_seconds=1.0)
    assert not explain_more_samples(budget, running=2.0, chunk_seconds=1.01)
    assert explain_more_samples(OverheadBudget(None), running=99.0, chunk_seconds=99.0)
    # the sample's order takes the classes in turn: any prefix is balanced
    assert interleave_classes(torch.tensor([0, 0, 1, 1, 1, 2])).tolist() == [0, 2, 5, 1, 3, 4]


def test_the_final_pass_explains_the_chunks_that_fit_and_they_equal_captum(digits):
    torch.manual_seed(0)
    cnn = SmallCNN(channels=[8, 16]).eval()
    cb = _chunked(60.0)  # 5% of 60 s: 3 s for the pass, a chunk costs 1 s
    cb.account.begin(final=True, in_fit=True)
    result = cb.explain(cnn, StubTrainer(DigitsSubset(digits)), stage="fit_end")
    # the minimum (16 samples: one per class of 10) always; then a chunk while 1 s fits: after 2 s (1 s
    # left) the third, after 3 s (none left) no fourth
    assert cb.asked == [8, 16, 24] and result.samples_explained == 24
    assert len(set(cb.sample.targets[:10].tolist())) == 10  # the first 10 samples: one per class
    x, t = cb.sample.inputs[:24], result.targets
    expected, delta = IntegratedGradients(cnn).attribute(
        x, baselines=torch.zeros_like(x), target=t, n_steps=8, return_convergence_delta=True
    )
    assert torch.equal(t, cnn(x).argmax(dim=1))
    torch.testing.assert_close(result.attributions, expected)
    torch.testing.assert_close(result.delta, delta.reshape(-1))
    torch.testing.assert_close(result.importance, expected.abs().mean(dim=0).flatten())
    report = cb.report()
    assert (report["num_samples"], report["samples_explained"]) == (32, 24)
    assert report["aggregated_over"]["samples"] == 24 and report["aggregated_over"]["of"] == 32
    assert {"top_features", "convergence_delta", "infidelity"} <= set(report["aggregated_over"]["numbers"])
    assert report["convergence_delta"] == pytest.approx(float(delta.abs().mean()), rel=1e-5)
    (entry,) = report["budget"]["skipped_passes"]
    assert (entry["what"], entry["explained"], entry["configured"], entry["minimum"]) == ("samples", 24, 32, 16)
    assert entry["would_cost_seconds"] == pytest.approx(1.0)  # the last chunk, at 1 s a chunk
    assert "24 of the 32 fixed samples" in entry["reason"] and entry["stage"] == "fit_end"
    assert cb.history[-1]["samples"] == 24

    # the checkpoint: the same sample in the same order, the last pass's count, drift on the common prefix
    resumed = Attribution(num_samples=32, method_kwargs={"n_steps": 8}, infidelity_samples=0,
                          sensitivity_samples=0, figures="never", progress=False)  # fmt: skip
    resumed.load_state_dict(cb.state_dict())
    assert resumed.sample.indices == cb.sample.indices and resumed.report()["samples_explained"] == 24
    full = resumed.explain(cnn, StubTrainer(DigitsSubset(digits)))  # not sized (outside fit): all 32
    assert full.samples_explained == 32 and resumed.report()["aggregated_over"]["samples"] == 32
    torch.testing.assert_close(full.attributions[:24], expected)  # a later pass: the same prefix
    prefix = full.input_attributions[:24].abs().flatten(1).mean(dim=0)
    assert full.drift == rank_correlation(prefix, result.input_attributions.abs().flatten(1).mean(dim=0))
    assert full.drift == pytest.approx(1.0, abs=1e-3)  # same weights, same samples compared


def test_without_a_budget_or_outside_fit_every_sample_is_explained(digits):
    torch.manual_seed(0)
    cnn = SmallCNN(channels=[8, 16]).eval()
    cb = _chunked(60.0, max_overhead=None)
    cb.budget = cb.account.budget = OverheadBudget(None, clock=lambda: cb.now[0])
    cb.account.begin(final=True, in_fit=True)
    assert cb.explain(cnn, StubTrainer(DigitsSubset(digits))).samples_explained == 32 and cb.asked == []
    cb = _chunked(1.0)  # a budget with nothing left, but not in fit (a manual explain): all
    cb.account.begin(final=True, in_fit=False)
    assert cb.explain(cnn, StubTrainer(DigitsSubset(digits))).samples_explained == 32
    assert cb.report()["budget"]["skipped_passes"] == []


class Tick(Callback):
    """60 s of fit on the fake clock before each validation."""

    def __init__(self, now):
        self.now = now

    def on_validation_epoch_start(self, trainer, pl_module):
        self.now[0] += 60.0


def test_a_fit_cuts_its_final_pass_to_the_budget_and_resumes_with_the_same_sample(tmp_path):
    torch.manual_seed(0)
    cb = _chunked(0.0)  # 2 classes: the minimum is the first chunk of 8
    trainer(tmp_path, [cb, Tick(cb.now)], max_epochs=1).fit(TabularMLP(input_dim=8, hidden_dims=[8]), Synthetic(512))
    report = cb.report()
    assert report["samples_explained"] == 24 and cb.asked == [8, 16, 24]  # 3 s: after 1, 2 s one more fits
    final = report["budget"]["final_pass"]
    assert final["samples"]["explained"] == 24 and final["samples"]["minimum"] == 8
    assert final["minimum_seconds"] == pytest.approx(1.0) and final["samples"]["chunk_seconds"] == pytest.approx(1.0)
    assert [s["what"] for s in report["budget"]["skipped_passes"]] == ["samples"]
    saved = torch.load(report["files"]["attributions"])
    assert saved["indices"] == cb.sample.indices[:24] and saved["attributions"].shape == (24, 8)
    # a killed and resumed run: the state carries the sample (its order), the record and the skipped chunks
    state = cb.state_dict()
    again = Attribution(num_samples=32)
    again.load_state_dict(state)
    assert again.sample.indices == cb.sample.indices and again.history == cb.history
    assert again.report()["budget"]["skipped_passes"] == report["budget"]["skipped_passes"]


def test_only_rank_zero_explains_and_decides():
    cb = _chunked(60.0)

    class Rank1(StubTrainer):
        is_global_zero = False
        sanity_checking = False

    cb._trigger(Rank1(Synthetic(64)), TabularMLP(input_dim=8, hidden_dims=[8]), "validation_end", hook_allows_log=True)
    assert cb.history == [] and cb.asked == [] and cb.skipped == [] and cb.budget.runs == 0
