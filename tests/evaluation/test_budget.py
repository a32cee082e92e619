"""The corrupted copies within ``max_overhead``: a suite cut to the budget (the same batches under every
corruption and severity, errors against the same samples clean) equal to a computation by hand, the
demo fit's account, the budget across a checkpoint.

The budget's clock is injected where the test asserts a count: it advances by a fixed cost per model
row, so every decision is a rule on numbers, never on the machine's speed."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_trust.core.budget import OverheadBudget
from lightning_trust.core.sizing import HEADROOM, MIN_SAMPLES, PassSizer
from lightning_trust.demo import SmallCNN
from lightning_trust.evaluation import CrossDomainEvaluation
from lightning_trust.evaluation.corruptions import corrupt_inputs
from lightning_trust.evaluation.extra_passes import corruption_seed, evaluate_corruptions
from lightning_trust.evaluation.metrics import MetricSpec
from lightning_trust.evaluation.results import DomainMetrics
from lightning_trust.evaluation.subset import SUBSET
from tests.support import trainer

ROW_SECONDS = 1e-3


def test_a_suite_cut_to_the_budget_equals_the_accuracy_by_hand_on_the_same_batches(digits):
    torch.manual_seed(0)
    model = SmallCNN(channels=[4, 8]).eval()
    now = [0.0]
    model.register_forward_hook(lambda _m, args, _o: now.__setitem__(0, now[0] + ROW_SECONDS * len(args[0])))
    budget = OverheadBudget(0.05, clock=lambda: now[0])
    budget.start()
    now[0] = 10.0  # 5% of 10 s: 0.5 s
    names = ["clean", "gaussian_noise_s3", "blur_s3", SUBSET]
    metrics = DomainMetrics(names, [MetricSpec.from_name("accuracy")], buffer_size=4096)
    loader = digits.val_dataloader()  # 5 batches of 64 (the last of 14)
    done = evaluate_corruptions(
        metrics, model, trainer(), loader, len(loader), _Contract(), corruptions=["gaussian_noise", "blur"],
        severities=[3], first=1, seed=0, value_range=(0.0, 1.0), prediction_type="logits",
        sizer=PassSizer(budget, final=True), subset=3,
    )  # fmt: skip
    # the first batch: 64 rows under 2 corruptions and clean, 0.192 s; then 90% of what is left at that rate
    first = 3 * 64 * ROW_SECONDS
    batches = 1 + math.floor(HEADROOM * (0.5 - first) / first)
    assert done == {"samples": 64 * batches, "batches": batches, "truncated": True} and batches < len(loader)
    values = metrics.compute(None, 1, torch.device("cpu"))
    assert values.sizes == {
        "clean": 0,
        "gaussian_noise_s3": 64 * batches,
        "blur_s3": 64 * batches,
        SUBSET: 64 * batches,
    }
    with torch.no_grad():
        for ci, name in enumerate(["gaussian_noise", "blur"]):
            right = total = 0
            for b, (x, y) in enumerate(loader):
                if b == batches:
                    break
                generator = torch.Generator().manual_seed(corruption_seed(0, 0, b, ci, 3))
                right += int((model(corrupt_inputs(x, name, 3, generator, (0.0, 1.0))).argmax(1) == y).sum())
                total += len(y)
            assert values.per_domain[f"{name}_s3"]["accuracy"] == pytest.approx(right / total)
        clean = [(model(x).argmax(1) == y).float() for b, (x, y) in enumerate(loader) if b < batches]
    assert values.per_domain[SUBSET]["accuracy"] == pytest.approx(float(torch.cat(clean).mean()))


class _Contract:
    """The digits batches: (images, labels)."""

    def inputs(self, batch):
        return batch[0]

    def target(self, batch):
        return batch[1]


@pytest.mark.slow
def test_a_demo_fit_stays_within_max_overhead_and_reports_what_it_evaluated(digits, tmp_path):
    torch.manual_seed(0)
    cb = CrossDomainEvaluation(corruptions=["gaussian_noise", "blur"], metrics=["accuracy"])  # max_overhead=0.05
    trainer(tmp_path, [cb], max_epochs=6).fit(SmallCNN(channels=[8, 16]), digits)
    report, history = cb.report(), cb.history
    account = report["overhead"]
    assert account["max_overhead"] == 0.05 and cb.severities == [1, 3, 5]  # the cheaper default
    assert account["runs"] + account["skipped"] == 6 == len(history)
    assert [h["extra_passes"] for h in history].count("run") == account["runs"]
    assert history[-1]["extra_passes"] == "run"  # the final pass always runs
    assert sum(account["pass_seconds"]) == pytest.approx(account["seconds"])
    # every pass is sized to what is left; the final one does at least one batch of 64 samples
    extra = report["extra_samples"]
    assert extra["corruptions"]["samples_available"] == 270 and extra["corruptions"]["samples"] >= MIN_SAMPLES
    assert extra["truncated"] == (extra["corruptions"]["samples"] < 270)
    assert report["sizes"]["blur_s5"] == extra["corruptions"]["samples"]
    if extra["truncated"]:  # the clean error of the same samples, not of the whole validation set
        assert SUBSET not in report["per_domain"] and "clean" in report["per_domain"]
    assert report["corruption"]["errors"]["blur"]["3"] >= 0
    # the figures are drawn when the report is read (above), not during fit
    assert report["figures"] and all(p.endswith(".png") for p in report["figures"].values())
    restored = CrossDomainEvaluation(corruptions=["blur"])
    restored.load_state_dict(cb.state_dict())
    assert restored.budget.runs == cb.budget.runs and restored.budget.spent == cb.budget.spent
    assert restored._passes.unit_seconds == cb._passes.unit_seconds > 0


def test_max_overhead_is_checked():
    with pytest.raises(ValueError, match="`max_overhead`"):
        CrossDomainEvaluation(corruptions=["blur"], max_overhead=0)
