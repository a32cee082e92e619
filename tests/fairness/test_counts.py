"""The count-table state: memory independent of the rows, honest numbers on empty denominators
(equal to fairlearn, never a smaller disparity), and bootstrap intervals that cover a known value."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_ratio,
    equal_opportunity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
)

from lightning_trust.fairness import METRICS, FairnessMetrics
from lightning_trust.fairness.counts import GroupCounts, Layout, state_bytes
from lightning_trust.fairness.tables import count_arrays, fairness_results
from lightning_trust.report.standards import judge, parse_standards
from tests.fairness.helpers import LogitModule, SyntheticDataModule, synthetic
from tests.support import trainer


@pytest.mark.parametrize("n_boot", [None, 20])
def test_state_memory_is_the_same_for_100_and_10000_rows(tmp_path, n_boot):
    sizes = {}
    for rows in (100, 10_000):
        cb = FairnessMetrics(["sex", "race", ["sex", "race"]], n_boot=n_boot, min_group_size=0)
        trainer(tmp_path / str(rows), callbacks=[cb]).validate(
            LogitModule(), SyntheticDataModule(synthetic(n=rows), batch_size=256), verbose=False
        )
        assert cb.report()["num_samples"] == rows
        sizes[rows] = (state_bytes(cb._collector.counts), cb.report()["state_bytes"])
    # 2 + 3 + 6 groups x 2 x 2 cells + the invalid cell, int64, times (1 + n_boot) tables
    expected = (11 * 4 + 1) * 8 * (1 + (n_boot or 0))
    assert sizes[100] == sizes[10_000] == (expected, expected)


def _crafted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group "c" has no positives; its predictions are mostly positive (fairlearn: TPR 0.0)."""
    rng = np.random.default_rng(3)
    group = np.repeat(np.array(["a", "b", "c"]), [120, 100, 40])
    y_true = np.concatenate([rng.integers(0, 2, 120), rng.integers(0, 2, 100), np.zeros(40, dtype=int)])
    y_pred = np.concatenate([(rng.random(120) < 0.7).astype(int), rng.integers(0, 2, 100), np.ones(40, dtype=int)])
    y_pred[-5:] = 0
    return y_true, y_pred, group


def _results(y_true, y_pred, group, metrics=("true_positive_rate", "false_positive_rate", "precision")):
    labels, codes = np.unique(group, return_inverse=True)
    layout = Layout(("g",), (len(labels),), ((0,),), 2)
    return fairness_results(count_arrays(layout, y_true, y_pred, codes), None, layout, {"g": list(labels)}, metrics)


def test_empty_denominator_equals_fairlearn_never_smaller():
    y_true, y_pred, group = _crafted()
    r = _results(y_true, y_pred, group)
    frame = MetricFrame(
        metrics={m: METRICS[m] for m in ("true_positive_rate", "false_positive_rate", "precision")},
        y_true=y_true,
        y_pred=y_pred,
        sensitive_features=group,
    )
    assert r["by_group"]["g"]["c"]["true_positive_rate"] == frame.by_group.loc["c", "true_positive_rate"] == 0.0
    reference = equalized_odds_difference(y_true, y_pred, sensitive_features=group)
    assert r["equalized_odds_difference"] == reference
    # the group with positives only is what used to be skipped: without it the disparity looked smaller
    keep = group != "c"
    assert reference > equalized_odds_difference(y_true[keep], y_pred[keep], sensitive_features=group[keep])
    assert r["equalized_odds_ratio"] == equalized_odds_ratio(y_true, y_pred, sensitive_features=group)
    flagged = {(f["group"], f["metric"]) for f in r["flags"]}
    assert ("c", "true_positive_rate") in flagged


def test_no_predicted_positives_precision_and_ratio_nan_not_met():
    y_true = np.array([1, 0, 1, 0, 1, 1, 0, 0])
    y_pred = np.zeros(8, dtype=int)  # nobody selected: every selection rate is 0, precision 0/0
    group = np.array(["a"] * 4 + ["b"] * 4)
    r = _results(y_true, y_pred, group)
    assert r["by_group"]["g"]["a"]["precision"] == METRICS["precision"](y_true[:4], y_pred[:4]) == 0.0
    fairlearn_ratio = demographic_parity_ratio(y_true, y_pred, sensitive_features=group)
    assert math.isnan(fairlearn_ratio) and math.isnan(r["demographic_parity_ratio"])
    assert math.isnan(equal_opportunity_ratio(y_true, y_pred, sensitive_features=group))
    assert math.isnan(r["equal_opportunity_ratio"])
    assert ("(all)", "demographic_parity_ratio") in {(f["group"], f["metric"]) for f in r["flags"]}
    # a standard on an undefined (NaN) number is not met: nothing in the report needs to change
    (standard,) = parse_standards({"fairness.demographic_parity_ratio": {"min": 0.8}})
    assert judge(standard, {"fairness.demographic_parity_ratio": r["demographic_parity_ratio"]})["status"] == "not_met"


def test_multiclass_class_absent_from_a_group_equals_fairlearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = rng.integers(0, 3, 300)
    g = np.array(["x", "y"])[rng.integers(0, 2, 300)]
    y[(g == "y") & (y == 2)] = 1  # class 2 never true in group y
    layout = Layout(("g",), (2,), ((0,),), 3)
    r = fairness_results(
        count_arrays(layout, y, p, (g == "y").astype(int)), None, layout, {"g": ["x", "y"]}, list(METRICS)
    )
    for c in range(3):
        yt, yp = (y == c).astype(int), (p == c).astype(int)
        frame = MetricFrame(metrics=METRICS, y_true=yt, y_pred=yp, sensitive_features=pd.Series(g, name="g"))
        for name, row in frame.by_group.iterrows():
            for metric, value in row.items():
                assert r["by_group"]["g"][str(c)][name][metric] == value, (c, name, metric)
        part = r["by_feature"]["g"]["classes"][str(c)]
        assert part["equalized_odds_difference"] == equalized_odds_difference(yt, yp, sensitive_features=g)


def test_replicate_tables_are_poisson_weighted_counts():
    layout = Layout(("g",), (3,), ((0,),), 2)
    counts = GroupCounts(layout, n_boot=5, seed=11)
    rng = np.random.default_rng(1)
    y, p, g = rng.integers(0, 2, 90), rng.integers(0, 2, 90), rng.integers(0, 3, 90)
    for rows in np.array_split(np.arange(90), 3):
        counts.update(torch.as_tensor(y[rows]), torch.as_tensor(p[rows]), torch.as_tensor(g[rows])[:, None])
    table, replicates = counts.compute()
    generator = torch.Generator().manual_seed(11)
    weights = torch.cat([torch.poisson(torch.ones(5, 30), generator=generator) for _ in range(3)], 1).long().numpy()
    index = layout.index(torch.as_tensor(y), torch.as_tensor(p), torch.as_tensor(g)[:, None])[:, 0].numpy()
    assert np.array_equal(table.numpy(), np.bincount(index, minlength=layout.size + 1))
    for b in range(5):
        assert np.array_equal(replicates[b].numpy(), np.bincount(index, weights=weights[b], minlength=layout.size + 1))


def test_bootstrap_interval_covers_a_known_selection_rate_gap():
    """Predictions Bernoulli(0.3) in group a and Bernoulli(0.5) in group b: the 90 % interval of the
    demographic parity difference covers the true 0.2 in about 90 % of 200 simulated data sets."""
    layout = Layout(("g",), (2,), ((0,),), 2)
    covered, widths = 0, []
    trials = 200
    for trial in range(trials):
        rng = np.random.default_rng(100 + trial)
        g = rng.integers(0, 2, 600)
        p = (rng.random(600) < np.where(g == 0, 0.3, 0.5)).astype(int)
        y = rng.integers(0, 2, 600)
        counts = GroupCounts(layout, n_boot=200, seed=trial)
        counts.update(torch.as_tensor(y), torch.as_tensor(p), torch.as_tensor(g)[:, None])
        table, replicates = counts.compute()
        r = fairness_results(
            table.numpy(), replicates.numpy(), layout, {"g": ["a", "b"]}, ["selection_rate"], ci_quantiles=[0.05, 0.95]
        )
        lo, hi = r["by_feature"]["g"]["demographic_parity_difference_ci"]
        covered += lo <= 0.2 <= hi
        widths.append(hi - lo)
    assert 0.84 <= covered / trials <= 0.96, covered
    # the width of a normal 90 % interval of a difference of two proportions (n = 300 each)
    expected = 2 * 1.645 * math.sqrt(0.3 * 0.7 / 300 + 0.5 * 0.5 / 300)
    assert np.mean(widths) == pytest.approx(expected, rel=0.1)
