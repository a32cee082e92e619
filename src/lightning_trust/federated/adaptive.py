"""Adaptive clipping for DP-FedAvg (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021,
"Differentially Private Learning with Adaptive Clipping"), used by
:class:`~lightning_trust.federated.dp.ClientDP` (``adaptive=AdaptiveClipping(...)``).

Each round, with clip norm ``C``, every participating client contributes ``b_i = 1`` when its
update norm is at most ``C`` (unclipped), else 0. The server releases the noisy unclipped fraction
``b = (sum b_i + N(0, count_stddev^2)) / m`` (``m``: expected clients per round) and moves
the clip norm geometrically towards the ``target_quantile`` of the update norms:
``C <- C * exp(-learning_rate * (b - target_quantile))``. The update is noised with the clip norm
the round used. The user's ``noise_multiplier`` ``z`` is the privacy of the two releases together:
the update gets ``z_delta = (z^-2 - (2 count_stddev)^-2)^-1/2``, so the accountant steps ``z``
(Andrew et al., Section 3.1); ``count_stddev`` defaults to ``m / 20`` as the paper recommends.

Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` (flwr 1.42) splits the noise the same
way and clips alike, but steps the clip norm with the fraction of *clipped* updates in place of the
unclipped one (``C`` shrinks when every update is clipped) and noises the update with the clip norm
of the next round; ``tests/federated/test_adaptive_clipping.py`` checks both against it.

Example:
    >>> adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    >>> z_delta, count_stddev = adaptive.noise_split(noise_multiplier=1.0, expected_clients=100)
    >>> round(z_delta, 4), count_stddev
    (1.005, 5.0)
    >>> round(adaptive.next_clip_norm(0.1, unclipped_fraction=0.0), 5)  # every update clipped: C grows
    0.11052
"""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["AdaptiveClipping"]


class AdaptiveClipping:
    """Geometric quantile tracking of DP-FedAvg's clip norm (Andrew et al., 2021).

    Args:
        target_quantile: share of client updates that should fall within the clip norm, in ``[0, 1]``
            (0.5: the median update norm).
        learning_rate: step size of the geometric update, > 0 (the paper's 0.2).
        count_stddev: standard deviation of the noise on the count of unclipped updates; ``None``:
            ``expected_clients / 20``.
    """

    def __init__(
        self, target_quantile: float = 0.5, learning_rate: float = 0.2, count_stddev: Optional[float] = None
    ) -> None:
        if isinstance(target_quantile, bool) or not (
            isinstance(target_quantile, (int, float)) and 0.0 <= target_quantile <= 1.0
        ):
            raise ValueError(f"`target_quantile` must be in [0, 1] (0.5: the median norm), got {target_quantile!r}.")
        if not (isinstance(learning_rate, (int, float)) and learning_rate > 0 and math.isfinite(learning_rate)):
            raise ValueError(
                f"`learning_rate` must be a finite number > 0 (the paper uses 0.2), got {learning_rate!r}."
            )
        if count_stddev is not None and not (
            isinstance(count_stddev, (int, float)) and count_stddev > 0 and math.isfinite(count_stddev)
        ):
            raise ValueError(
                f"`count_stddev` must be a finite number > 0 or None (expected clients / 20), got {count_stddev!r}."
            )
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_stddev = None if count_stddev is None else float(count_stddev)

    def stddev_for(self, expected_clients: float) -> float:
        """The count noise's standard deviation with ``expected_clients`` per round."""
        return self.count_stddev if self.count_stddev is not None else expected_clients / 20.0

    def noise_split(self, noise_multiplier: float, expected_clients: float) -> tuple[float, float]:
        """``(z_delta, count_stddev)``: the update's noise multiplier and the count's noise, which
        together are as private as one Gaussian release at ``noise_multiplier``.

        Raises ValueError when ``noise_multiplier >= 2 * count_stddev`` (the count alone would
        spend the whole budget), naming the fix.
        """
        count = self.stddev_for(expected_clients)
        if noise_multiplier == 0:
            return 0.0, 0.0
        if noise_multiplier >= 2 * count:
            raise ValueError(
                f"Adaptive clipping with noise_multiplier={noise_multiplier} needs count_stddev > "
                f"{noise_multiplier / 2}, got {count} ({'expected clients / 20' if self.count_stddev is None else 'set'}"
                f" with {expected_clients:g} expected clients per round). Set `AdaptiveClipping(count_stddev=...)` "
                "above noise_multiplier / 2, sample more clients per round, or lower `noise_multiplier`."
            )
        return (noise_multiplier**-2 - (2 * count) ** -2) ** -0.5, count

    def next_clip_norm(self, clip_norm: float, unclipped_fraction: float) -> float:
        """``clip_norm * exp(-learning_rate * (unclipped_fraction - target_quantile))``."""
        return clip_norm * math.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile))

    def report(self) -> dict[str, Any]:
        return {
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "count_stddev": self.count_stddev,
        }

    def __repr__(self) -> str:
        return (
            f"AdaptiveClipping(target_quantile={self.target_quantile}, learning_rate={self.learning_rate}, "
            f"count_stddev={self.count_stddev})"
        )
