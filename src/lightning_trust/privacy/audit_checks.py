"""The arguments and setups :class:`~lightning_trust.privacy.PrivacyAudit` refuses, before training.

Example:
    >>> check_arguments(100, "input", "dirac", "random", "loss", None, None, 0.95, None)
    >>> check_with_dp("gradient", None)
    Traceback (most recent call last):
    ...
    ValueError: PrivacyAudit(canaries='gradient') adds canaries to the DP optimizer's clipped gradients, and this Trainer has no DifferentialPrivacy callback. Add DifferentialPrivacy (noise_multiplier=0 audits clipping alone), or use canaries='input'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from lightning_trust.privacy.callback import DifferentialPrivacy

__all__ = ["check_arguments", "check_with_dp"]


def check_arguments(
    num_canaries: int,
    canaries: str,
    gradient_canary: str,
    canary_labels: str,
    score: str,
    k_plus: Optional[int],
    k_minus: Optional[int],
    confidence: float,
    delta: Optional[float],
) -> None:
    """Refuse a bad ``PrivacyAudit`` argument, naming the value and the fix."""
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
        raise ValueError(f"`num_canaries` must be an integer >= 2, got {num_canaries!r}.")
    for label, value, allowed in (
        ("canaries", canaries, ("input", "gradient")),
        ("gradient_canary", gradient_canary, ("dirac", "gaussian")),
        ("canary_labels", canary_labels, ("random", "true")),
        ("score", score, ("loss", "margin")),
    ):
        if value not in allowed:
            raise ValueError(f"`{label}` must be one of {list(allowed)}, got {value!r}.")
    for label, k in (("k_plus", k_plus), ("k_minus", k_minus)):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"`{label}` must be a non-negative integer or None, got {k!r}.")
    if (k_plus is not None or k_minus is not None) and (k_plus or 0) + (k_minus or 0) == 0:
        raise ValueError("`k_plus + k_minus` must be at least 1 (the guesses); leave both None to search.")
    if (k_plus or 0) + (k_minus or 0) > num_canaries:
        raise ValueError(
            f"`k_plus + k_minus` = {(k_plus or 0) + (k_minus or 0)} guesses exceed num_canaries={num_canaries}."
        )
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95; got {confidence!r}.")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1):
        raise ValueError(f"`delta` must be in [0, 1) or None (the DifferentialPrivacy δ), got {delta!r}.")


def check_with_dp(canaries: str, dp: Optional[DifferentialPrivacy]) -> None:
    """Refuse the audits that cannot run beside (or without) this run's DP, before training."""
    if canaries == "gradient" and dp is None:
        raise ValueError(
            "PrivacyAudit(canaries='gradient') adds canaries to the DP optimizer's clipped gradients, and this "
            "Trainer has no DifferentialPrivacy callback. Add DifferentialPrivacy (noise_multiplier=0 audits "
            "clipping alone), or use canaries='input'."
        )
    if dp is None:
        return
    if canaries == "input" and dp.dataset_size is not None:
        raise ValueError(
            f"DifferentialPrivacy(dataset_size={dp.dataset_size}) fixes N, but the input canaries change the training "
            "set's size; leave dataset_size unset (a map-style dataset has a length)."
        )
