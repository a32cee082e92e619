"""Confidence intervals of proportions measured on a sample (an accuracy on the samples a budgeted
pass evaluated): Wilson's score interval, which stays inside [0, 1] and is honest for small samples
and for proportions near 0 or 1 (where the normal approximation collapses to a point).

Example:
    >>> lo, hi = wilson_interval(52, 64)
    >>> round(lo, 4), round(hi, 4)
    (0.7003, 0.8894)
    >>> wilson_interval(0, 0) is None          # nothing measured: no interval
    True
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["CONFIDENCE", "wilson_interval"]

#: The confidence level of every interval the pack reports.
CONFIDENCE = 0.95
_Z = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: float, n: float, z: float = _Z) -> Optional[list[float]]:
    """Wilson's score interval ``[low, high]`` of ``successes`` out of ``n`` (95% at the default ``z``);
    ``None`` when ``n`` is 0. Equals ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``."""
    if n <= 0:
        return None
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return [max(center - half, 0.0), min(center + half, 1.0)]
