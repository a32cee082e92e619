"""The statistics of the one-run privacy audit (Steinke, Nasr and Jagielski, "Privacy Auditing with
One (1) Training Run", NeurIPS 2023): guesses from canary scores, and the empirical ε lower bound.

Each of ``m`` canaries is included in training with probability 1/2. The auditor guesses "in" for
the ``k+`` highest scores, "out" for the ``k-`` lowest and abstains on the rest; under (ε, δ)-DP the
number of correct guesses ``v`` out of ``r = k+ + k-`` is stochastically dominated by
``Binomial(r, e^ε / (1 + e^ε))``, up to a δ term (the paper's Theorem 5.2 / Corollary 5.4). The
p-value of ``v`` and the largest ε it rejects are the paper's Appendix D code
(``p_value_DP_audit``, ``get_eps_audit``), here with the inner sum vectorised.

Choosing ``k``: :func:`audit` takes fixed ``k+``/``k-``, or searches a grid of ``k+ = k- = k`` and
keeps the best bound, each candidate tested at ``(1 - confidence) / len(grid)`` (a union bound),
so the reported bound keeps its confidence whatever ``k`` wins.

Example:
    >>> round(epsilon_lower_bound(1000, 100, 75, delta=1e-4, confidence=0.95), 3)  # the paper's App. D example
    0.673
    >>> import numpy as np
    >>> scores = np.array([5.0, 4.0, 3.0, -3.0, -4.0, -5.0]); included = np.array([1, 1, 1, 0, 0, 0], bool)
    >>> result = audit(scores, included, delta=0.0, confidence=0.95, k_plus=3, k_minus=3)
    >>> result.guesses, result.correct, round(result.epsilon_lower_bound, 3)
    (6, 6, 0.435)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import stats

__all__ = ["AuditResult", "audit", "correct_guesses", "epsilon_lower_bound", "k_grid", "p_value"]

_BISECTIONS = 30  # the reference's precision: 30 halvings of an integer bracket


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[>= ``correct`` right out of ``guesses``] for an (ε, δ)-DP algorithm audited with ``m`` canaries.

    ``beta = P[Binomial(r, q) >= v]`` with ``q = e^ε / (1 + e^ε)``, plus ``2 m δ`` times
    ``alpha = max_i P[v > Binomial(r, q) >= v - i] / i`` (the paper's δ term).
    """
    _check_counts(m, guesses, correct)
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"Need epsilon >= 0 and 0 <= delta <= 1, got epsilon={epsilon}, delta={delta}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(correct - 1, guesses, q))
    alpha = 0.0
    if delta > 0 and correct > 0:
        i = np.arange(1, correct + 1)
        below = np.cumsum(stats.binom.pmf(correct - i, guesses, q))  # P[v > Bin >= v - i], i = 1..v
        alpha = float(np.max(below / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε (to 2^-30 of its bracket) that ``correct`` out of ``guesses`` rejects at ``confidence``:
    with that confidence the run is not (ε, δ)-DP for any smaller ε. 0 when nothing is rejected."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    level = 1.0 - confidence
    low, high = 0.0, 1.0
    while p_value(m, guesses, correct, high, delta) < level:
        high += 1.0
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if p_value(m, guesses, correct, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def correct_guesses(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> int:
    """Right guesses when the ``k_plus`` highest scores are guessed in and the ``k_minus`` lowest out
    (ties broken by canary index, which the coin does not see)."""
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_plus], order[len(order) - k_minus :] if k_minus else order[:0]
    return int(included[top].sum() + (~included[bottom]).sum())


def k_grid(m: int, steps: int = 6) -> list[int]:
    """Symmetric guess counts ``k+ = k-`` searched by default: ``m/2, m/4, ...`` (``steps`` halvings, >= 1)."""
    return sorted({max(1, (m // 2) >> j) for j in range(steps)}, reverse=True)


@dataclass(frozen=True)
class AuditResult:
    """The audit's outcome: the bound and the guesses that gave it (``candidates``: every ``k`` tried)."""

    epsilon_lower_bound: float
    k_plus: int
    k_minus: int
    correct: int
    confidence: float
    selection: str  # "fixed" or "search"
    candidates: list[dict[str, float]] = field(default_factory=list)

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


def audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = 0.95,
    k_plus: Optional[int] = None,
    k_minus: Optional[int] = None,
) -> AuditResult:
    """The ε lower bound of one run's canary ``scores`` (higher: more likely included) and coin ``included``.

    With ``k_plus``/``k_minus`` (either; the other defaults to 0) the guesses are fixed and tested at
    ``confidence``. Without, :func:`k_grid` is searched with the confidence split evenly over it.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    m = len(s)
    if m == 0 or len(inc) != m:
        raise ValueError(f"Need one coin per score and at least one canary, got {m} scores and {len(inc)} coins.")
    if not np.all(np.isfinite(s)):
        raise ValueError("Canary scores must be finite (a NaN/inf loss cannot be ranked).")
    if k_plus is None and k_minus is None:
        grid = [(k, k) for k in k_grid(m)]
        selection, level = "search", 1.0 - (1.0 - confidence) / len(grid)
    else:
        grid = [(int(k_plus or 0), int(k_minus or 0))]
        selection, level = "fixed", confidence
        if grid[0][0] < 0 or grid[0][1] < 0 or sum(grid[0]) == 0 or sum(grid[0]) > m:
            raise ValueError(f"Need 0 < k_plus + k_minus <= m = {m} and both >= 0, got {grid[0]}.")
    best: Optional[AuditResult] = None
    candidates = []
    for kp, km in grid:
        right = correct_guesses(s, inc, kp, km)
        bound = epsilon_lower_bound(m, kp + km, right, delta, level)
        candidates.append({"k_plus": kp, "k_minus": km, "correct": right, "epsilon_lower_bound": bound})
        if best is None or bound > best.epsilon_lower_bound:
            best = AuditResult(bound, kp, km, right, confidence, selection)
    assert best is not None
    return AuditResult(
        best.epsilon_lower_bound, best.k_plus, best.k_minus, best.correct, confidence, selection, candidates
    )


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"Need 0 <= correct <= guesses <= m, got correct={correct}, guesses={guesses}, m={m}.")
