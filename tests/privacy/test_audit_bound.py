"""The one-run audit's bound equals the paper's reference code on fixed counts (no JAX, no training)."""

import math

import numpy as np
import pytest
import scipy.stats

from lightning_trust.privacy.audit_bound import audit, correct_guesses, epsilon_lower_bound, k_grid, p_value


# Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023, Appendix D,
# as printed there (m canaries, r guesses, v correct).
def p_value_DP_audit(m, r, v, eps, delta):
    assert 0 <= v <= r <= m
    assert eps >= 0
    assert 0 <= delta <= 1
    q = 1 / (1 + math.exp(-eps))  # accuracy of eps-DP randomized response
    beta = scipy.stats.binom.sf(v - 1, r, q)  # = P[Binomial(r, q) >= v]
    alpha = 0
    sum = 0  # = P[v > Binomial(r, q) >= v - i]
    for i in range(1, v + 1):
        sum = sum + scipy.stats.binom.pmf(v - i, r, q)
        if sum > i * alpha:
            alpha = sum / i
    p = beta + alpha * delta * 2 * m
    return min(p, 1)


def get_eps_audit(m, r, v, delta, p):
    assert 0 <= v <= r <= m
    assert 0 <= delta <= 1
    assert 0 < p < 1
    eps_min = 0  # maintain p_value_DP(eps_min) < p
    eps_max = 1  # maintain p_value_DP(eps_max) >= p
    while p_value_DP_audit(m, r, v, eps_max, delta) < p:
        eps_max = eps_max + 1
    for _ in range(30):  # binary search
        eps = (eps_min + eps_max) / 2
        if p_value_DP_audit(m, r, v, eps, delta) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


COUNTS = [  # (m, r, v, delta, confidence); the reference's loop is slow, so counts stay small
    (1000, 100, 75, 1e-4, 0.95),
    (1000, 60, 60, 0.0, 0.95),
    (1000, 300, 100, 1e-5, 0.99),
    (200, 80, 70, 1e-3, 0.99),
    (200, 50, 26, 1e-3, 0.95),
    (100, 10, 0, 1e-5, 0.95),
    (64, 6, 6, 0.0, 0.95),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "confidence"), COUNTS)
def test_the_bound_is_the_papers_on_fixed_counts(m, r, v, delta, confidence):
    assert epsilon_lower_bound(m, r, v, delta, confidence) == pytest.approx(
        get_eps_audit(m, r, v, delta, 1 - confidence), abs=1e-9
    )
    for eps in (0.0, 0.5, 2.0, 6.0):
        assert p_value(m, r, v, eps, delta) == pytest.approx(p_value_DP_audit(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_the_papers_printed_values():
    # Appendix D's worked example, and the bound of Section 7 (m = 10^5, 1439 of 1510 right)
    assert epsilon_lower_bound(1000, 100, 75, 1e-4, 0.95) == pytest.approx(0.673, abs=1e-3)
    assert epsilon_lower_bound(100000, 1510, 1439, 1e-5, 0.95) == pytest.approx(2.675, abs=1e-3)


def test_a_chance_level_audit_shows_nothing_and_delta_only_lowers_the_bound():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 200, 180, 1e-3) < epsilon_lower_bound(1000, 200, 180, 0.0)


def test_guesses_are_the_top_and_bottom_scores():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2])
    included = np.array([True, False, False, False, True, True])
    # top 2: canaries 0 (in, right) and 2 (out, wrong); bottom 2: canaries 1 (out, right) and 5 (in, wrong)
    assert correct_guesses(scores, included, 2, 2) == 2
    assert correct_guesses(scores, included, 3, 0) == 2
    assert correct_guesses(scores, included, 0, 1) == 1


def test_fixed_guesses_and_the_search_with_its_union_bound():
    rng = np.random.default_rng(0)
    included = rng.random(120) < 0.5
    scores = included * 2.0 + rng.standard_normal(120)
    fixed = audit(scores, included, delta=1e-5, confidence=0.95, k_plus=20, k_minus=10)
    right = correct_guesses(scores, included, 20, 10)
    assert (fixed.guesses, fixed.correct, fixed.selection) == (30, right, "fixed")
    assert fixed.epsilon_lower_bound == pytest.approx(get_eps_audit(120, 30, right, 1e-5, 0.05), abs=1e-9)

    searched = audit(scores, included, delta=1e-5, confidence=0.95)
    grid = k_grid(120)
    assert grid == [60, 30, 15, 7, 3, 1] and searched.selection == "search"
    level = 0.05 / len(grid)
    expected = [get_eps_audit(120, 2 * k, correct_guesses(scores, included, k, k), 1e-5, level) for k in grid]
    assert [c["epsilon_lower_bound"] for c in searched.candidates] == pytest.approx(expected, abs=1e-9)
    assert searched.epsilon_lower_bound == pytest.approx(max(expected), abs=1e-9) and max(expected) > 0.5
    assert searched.k_plus == searched.k_minus == grid[int(np.argmax(expected))]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, 0.0, confidence=1.0)
    with pytest.raises(ValueError, match="finite"):
        audit([0.0, float("nan")], [True, False], delta=0.0)
    with pytest.raises(ValueError, match="k_plus \\+ k_minus"):
        audit([0.0, 1.0], [True, False], delta=0.0, k_plus=2, k_minus=1)
