"""The corrupted copies within ``max_overhead`` of a demo fit (the final pass always runs)."""

from __future__ import annotations

import pytest
import torch

from lightning_trust.demo import SmallCNN
from lightning_trust.evaluation import CrossDomainEvaluation
from tests.support import trainer


@pytest.mark.slow
def test_measured_overhead_stays_under_max_overhead_except_the_final_run(digits, tmp_path):
    torch.manual_seed(0)
    cb = CrossDomainEvaluation(corruptions=["gaussian_noise", "blur"], severities=[3], metrics=["accuracy"],
                               figures=False)  # fmt: skip  # default max_overhead=0.05
    trainer(tmp_path, [cb], max_epochs=8).fit(SmallCNN(channels=[8, 16]), digits)
    account, history = cb.report()["overhead"], cb.history
    assert account["max_overhead"] == 0.05
    assert account["runs"] + account["skipped"] == 8 == len(history)
    assert account["skipped"] >= 1  # each pass costs more than 5% of an epoch: some are spaced out
    assert [h["extra_passes"] for h in history].count("run") == account["runs"]
    assert history[0]["extra_passes"] == "run" and history[-1]["extra_passes"] == "run"  # first and final
    fit_seconds = account["seconds"] / account["overhead"]
    assert sum(account["pass_seconds"]) == pytest.approx(account["seconds"])
    # the budget admits a pass when its expected cost (the mean so far) fits; the first pass (nothing measured
    # yet) or one slower than the mean may overshoot by at most that one pass (timings vary with the load)
    before_final = account["pass_seconds"][:-1]
    assert sum(before_final) <= 0.05 * fit_seconds + max(before_final), (account, fit_seconds)
    # a skipped epoch reports its clean domain only, never empty corrupted ones
    skipped = next(i for i, h in enumerate(history) if h["extra_passes"] == "skipped")
    assert history[skipped]["worst_domain"] == {"accuracy": "clean"}
    assert cb.report()["corruption"]["errors"]["blur"]["3"] >= 0


def test_max_overhead_is_checked():
    with pytest.raises(ValueError, match="`max_overhead`"):
        CrossDomainEvaluation(corruptions=["blur"], max_overhead=0)
