"""Shift tests against hand computations (exact permutation enumeration, per-dimension KS with
corrections), the bounded reservoir, and the embedding layer of the tiny BERT."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_trust.evaluation.embeddings import find_head
from lightning_trust.evaluation.reservoir import SampleReservoir
from lightning_trust.evaluation.shift import gaussian_kernel, ks_test, mmd_test, unbiased_mmd2


def _mmd_by_hand(x, y, s):
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * s * s))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_unbiased_mmd_and_exact_permutation_p_value_by_hand():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 2)), rng.normal(0.8, size=(3, 2))
    pooled = np.concatenate([x, y])
    kernel, s = gaussian_kernel(pooled)
    d = [np.linalg.norm(a - b) for a, b in itertools.combinations(pooled, 2)]
    assert s == pytest.approx(np.median(d))
    labels = np.r_[np.ones(4, bool), np.zeros(3, bool)]
    assert unbiased_mmd2(kernel, labels) == pytest.approx(_mmd_by_hand(x, y, s))
    observed = _mmd_by_hand(x, y, s)
    stats_all = [_mmd_by_hand(pooled[list(c)], pooled[[i for i in range(7) if i not in c]], s)
                 for c in itertools.combinations(range(7), 4)]  # fmt: skip
    exact = np.mean([v >= observed - 1e-12 for v in stats_all])  # 35 relabellings: scipy tests exactly
    result = mmd_test(x, y, n_permutations=1000, seed=0)
    assert result["statistic"] == pytest.approx(observed) and result["p_value"] == pytest.approx(exact)
    assert (result["n_reference"], result["n_domain"]) == (4, 3)


@pytest.mark.parametrize("correction", ["bonferroni", "fdr_bh"])
def test_ks_per_dimension_with_correction(correction):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 5))
    y = np.c_[rng.normal(size=(60, 4)), rng.normal(1.5, size=(60, 1))]
    p = np.array([stats.ks_2samp(x[:, j], y[:, j]).pvalue for j in range(5)])
    adjusted = np.minimum(1, 5 * p) if correction == "bonferroni" else stats.false_discovery_control(p)
    result = ks_test(x, y, correction)
    assert result["p_value"] == pytest.approx(adjusted.min()) and result["shifted_dimensions"] == int(
        (adjusted < 0.05).sum()
    )
    assert result["shifted_dimensions"] >= 1


def test_reservoir_is_bounded_seeded_and_resumes():
    a = SampleReservoir(50, seed=3)
    for i in range(10):
        a.add({"x": torch.arange(i * 30, (i + 1) * 30).float(), "y": torch.arange(30)})
    assert len(a) == 50 and a.seen == 300 and len(set(a.rows()["x"].tolist())) == 50
    b = SampleReservoir(50, seed=3)
    for i in range(5):
        b.add({"x": torch.arange(i * 30, (i + 1) * 30).float(), "y": torch.arange(30)})
    c = SampleReservoir(50, seed=99)
    c.load_state_dict(b.state_dict())
    for i in range(5, 10):
        c.add({"x": torch.arange(i * 30, (i + 1) * 30).float(), "y": torch.arange(30)})
    assert torch.equal(c.rows()["x"], a.rows()["x"])
    with pytest.raises(ValueError, match="capacity"):
        SampleReservoir(0)


def test_the_head_of_the_tiny_bert_and_a_wrong_layer():
    from tests.foundation.models import build

    module, _ = build("bert")
    assert find_head(module, 2, None)[0] == "model.classifier"
    with pytest.raises(ValueError, match="embedding_layer='model.nope'"):
        find_head(module, 2, "model.nope")
