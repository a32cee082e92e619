"""Two-sample shift tests between training and a domain's embeddings: MMD with a permutation
p-value, and per-dimension Kolmogorov-Smirnov tests with a multiple-testing correction.

* ``mmd``: the unbiased squared MMD (Gretton et al., 2012) with a Gaussian kernel whose bandwidth
  is the median pairwise distance of the pooled sample; the p-value is ``scipy.stats.permutation_test``'s
  (``(hits + 1) / (n_permutations + 1)``) over relabellings of the pooled sample, each relabelling
  scored from the one kernel matrix (a matrix product, no kernel recomputed).
* ``ks``: ``scipy.stats.ks_2samp`` on every dimension; the test rejects when any corrected p-value
  is below the level: Bonferroni (``min(1, d * p_min)``, reported as the p-value) or
  Benjamini-Hochberg (``scipy.stats.false_discovery_control``; its smallest adjusted p-value).

No maintained drift library installs without a second framework or stale pins (alibi-detect
pulls TensorFlow, frouros pins older numpy/scipy, torchdrift's last release is from 2021), so the
tests stand on scipy.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> same = mmd_test(rng.normal(size=(60, 3)), rng.normal(size=(50, 3)), n_permutations=200, seed=0)
    >>> moved = mmd_test(rng.normal(size=(60, 3)), rng.normal(1.0, size=(50, 3)), n_permutations=200, seed=0)
    >>> same["p_value"] > 0.05, moved["p_value"] < 0.01
    (True, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

__all__ = ["SHIFT_TESTS", "gaussian_kernel", "ks_test", "mmd_test", "unbiased_mmd2"]

#: The available tests.
SHIFT_TESTS: tuple[str, ...] = ("mmd", "ks")


def gaussian_kernel(pooled: np.ndarray) -> tuple[np.ndarray, float]:
    """``(K, bandwidth)``: ``K_ij = exp(-|z_i - z_j|^2 / (2 s^2))`` with ``s`` the median pairwise
    distance of ``pooled`` (1 when all points coincide)."""
    z = np.asarray(pooled, dtype=np.float64)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    upper = d2[np.triu_indices(len(z), k=1)]
    median = float(np.sqrt(np.median(upper))) if upper.size else 0.0
    bandwidth = median if median > 0 else 1.0
    return np.exp(-d2 / (2.0 * bandwidth**2)), bandwidth


def unbiased_mmd2(kernel: np.ndarray, in_x: np.ndarray) -> np.ndarray:
    """Unbiased squared MMD for each labelling: ``in_x`` ``(..., N)`` booleans (True: sample x)."""
    u = np.asarray(in_x, dtype=np.float64)
    v = 1.0 - u
    n, m = u.sum(axis=-1), v.sum(axis=-1)
    diag = np.diag(kernel)
    ku, kv = u @ kernel, v @ kernel  # (..., N)
    xx = (np.sum(ku * u, axis=-1) - u @ diag) / (n * (n - 1))
    yy = (np.sum(kv * v, axis=-1) - v @ diag) / (m * (m - 1))
    xy = np.sum(ku * v, axis=-1) / (n * m)
    return np.asarray(xx + yy - 2.0 * xy)


def mmd_test(x: np.ndarray, y: np.ndarray, n_permutations: int = 500, seed: int = 0) -> dict[str, Any]:
    """MMD two-sample test of ``x`` ``(n, d)`` against ``y`` ``(m, d)``: statistic (unbiased MMD^2),
    permutation p-value, bandwidth and sizes."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"The MMD test needs at least 2 samples on each side, got {len(x)} and {len(y)}.")
    kernel, bandwidth = gaussian_kernel(np.concatenate([x, y]))
    total = len(x) + len(y)

    def statistic(idx_x: np.ndarray, idx_y: np.ndarray, axis: int = -1) -> np.ndarray:
        ix = np.moveaxis(np.asarray(idx_x), axis, -1).astype(np.int64)
        labels = np.zeros((*ix.shape[:-1], total), dtype=bool)
        np.put_along_axis(labels, ix, True, axis=-1)
        return unbiased_mmd2(kernel, labels)

    result = stats.permutation_test(
        (np.arange(len(x)), np.arange(len(x), total)), statistic, permutation_type="independent",
        vectorized=True, n_resamples=n_permutations, alternative="greater", rng=np.random.default_rng(seed),
        batch=64,
    )  # fmt: skip
    return {"test": "mmd", "statistic": float(result.statistic), "p_value": float(result.pvalue),
            "bandwidth": bandwidth, "n_reference": len(x), "n_domain": len(y), "permutations": n_permutations}  # fmt: skip


def ks_test(x: np.ndarray, y: np.ndarray, correction: str = "bonferroni") -> dict[str, Any]:
    """Per-dimension KS tests of ``x`` against ``y``; the corrected p-value of the most shifted
    dimension, the largest KS statistic, and how many dimensions are below 0.05 after correction."""
    if correction not in ("bonferroni", "fdr_bh"):
        raise ValueError(f"`correction` must be 'bonferroni' or 'fdr_bh', got {correction!r}.")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    result = stats.ks_2samp(x, y, axis=0)
    p = np.atleast_1d(np.asarray(result.pvalue, dtype=np.float64))
    statistic = np.atleast_1d(np.asarray(result.statistic, dtype=np.float64))
    adjusted = np.minimum(1.0, p * len(p)) if correction == "bonferroni" else stats.false_discovery_control(p)
    return {"test": "ks", "correction": correction, "statistic": float(statistic.max()),
            "p_value": float(adjusted.min()), "dimensions": len(p), "shifted_dimensions": int((adjusted < 0.05).sum()),
            "n_reference": len(x), "n_domain": len(y)}  # fmt: skip
