"""What :class:`~lightning_trust.evaluation.uncertainty.UncertaintyEvaluation` refuses at construction.

Example:
    >>> check_uncertainty_arguments(confidence_level=0.9, scores=["lac"], calibration_fraction=0.5,
    ...     mondrian=None, sensitive_features=["sex"], domain_key=None, shift_tests=["mmd"], ks_correction="fdr_bh",
    ...     shift_samples=200, n_permutations=100, max_samples=1000, n_bins=15, every_n_epochs=1, min_cell_samples=20)
    >>> check_uncertainty_arguments(confidence_level=0.9, scores=["lac"], calibration_fraction=0.5,
    ...     mondrian="race", sensitive_features=["sex"], domain_key=None, shift_tests=[], ks_correction="fdr_bh",
    ...     shift_samples=200, n_permutations=100, max_samples=1000, n_bins=15, every_n_epochs=1, min_cell_samples=20)
    Traceback (most recent call last):
    ...
    ValueError: `mondrian='race'` must name a column this callback reads: one of `sensitive_features` (['sex']) or `domain_key` (None); add it there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

from lightning_trust.evaluation.conformal import SCORES
from lightning_trust.evaluation.shift import SHIFT_TESTS

__all__ = ["check_uncertainty_arguments", "scores_for"]


def _positive_int(name: str, value: object, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")


def check_uncertainty_arguments(
    *,
    confidence_level: float,
    scores: Sequence[str],
    calibration_fraction: float,
    mondrian: Optional[str],
    sensitive_features: Sequence[str],
    domain_key: Optional[str],
    shift_tests: Sequence[str],
    ks_correction: str,
    shift_samples: int,
    n_permutations: int,
    max_samples: int,
    n_bins: int,
    every_n_epochs: int,
    min_cell_samples: int,
    include_last_label: Union[bool, str] = True,
    figures: str = "report",
    conformal_on: str = "raw",
    temperature_scaling: bool = True,
) -> None:
    """Raise ``ValueError`` naming the value, the problem and the fix."""
    if include_last_label not in (True, False, "randomized"):
        raise ValueError(f"`include_last_label` must be true, false or 'randomized', got {include_last_label!r}.")
    if figures not in ("report", "never"):
        raise ValueError(f"`figures` must be 'report' or 'never', got {figures!r}.")
    if conformal_on not in ("raw", "calibrated"):
        raise ValueError(f"`conformal_on` must be 'raw' or 'calibrated', got {conformal_on!r}.")
    if conformal_on == "calibrated" and not temperature_scaling:
        raise ValueError(
            "`conformal_on='calibrated'` builds the sets from the temperature-scaled probabilities, and "
            "`temperature_scaling=False` fits no temperature; set `temperature_scaling=True` or `conformal_on='raw'`."
        )
    if not isinstance(confidence_level, float) or not 0.0 < confidence_level < 1.0:
        raise ValueError(
            f"`confidence_level` must be a float in (0, 1) (the target coverage), got {confidence_level!r}."
        )
    unknown = [s for s in scores if s not in SCORES]
    if unknown or isinstance(scores, str):
        raise ValueError(f"`scores` must be a list of {list(SCORES)}, got {scores!r}.")
    if len(set(scores)) != len(scores):
        raise ValueError(f"`scores` lists a score twice: {list(scores)}.")
    if not isinstance(calibration_fraction, float) or not 0.0 < calibration_fraction < 1.0:
        raise ValueError(
            f"`calibration_fraction` must be a float in (0, 1): the share of validation held out to calibrate, the "
            f"rest evaluates; got {calibration_fraction!r}."
        )
    if isinstance(sensitive_features, str):
        raise ValueError(f"`sensitive_features` must be a list of column names, got the string {sensitive_features!r}.")
    if mondrian is not None and mondrian not in (*sensitive_features, domain_key):
        raise ValueError(
            f"`mondrian={mondrian!r}` must name a column this callback reads: one of `sensitive_features` "
            f"({list(sensitive_features)}) or `domain_key` ({domain_key!r}); add it there."
        )
    if domain_key is not None and domain_key in sensitive_features:
        raise ValueError(f"`domain_key={domain_key!r}` is also in `sensitive_features`; list it in one place.")
    bad = [t for t in shift_tests if t not in SHIFT_TESTS]
    if bad or isinstance(shift_tests, str):
        raise ValueError(f"`shift_tests` must be a list of {list(SHIFT_TESTS)} (or []), got {shift_tests!r}.")
    if ks_correction not in ("bonferroni", "fdr_bh"):
        raise ValueError(f"`ks_correction` must be 'bonferroni' or 'fdr_bh', got {ks_correction!r}.")
    _positive_int("shift_samples", shift_samples, 10)
    _positive_int("n_permutations", n_permutations, 19)  # fewer cannot give p < 0.05
    _positive_int("max_samples", max_samples, 100)
    _positive_int("n_bins", n_bins, 2)
    _positive_int("every_n_epochs", every_n_epochs)
    _positive_int("min_cell_samples", min_cell_samples)


def scores_for(num_classes: int, scores: Optional[Sequence[str]]) -> list[str]:
    """The scores for ``num_classes`` classes: all by default, LAC alone for two; APS/RAPS asked
    for on two classes are refused (MAPIE: 'the only valid score is lac' for a binary target)."""
    if num_classes > 2:
        return list(scores) if scores is not None else list(SCORES)
    if scores is None:
        return ["lac"]
    binary = [s for s in scores if s != "lac"]
    if binary:
        raise ValueError(
            f"UncertaintyEvaluation(scores={list(scores)}): {binary} are defined for more than two classes and the "
            "labels have two (MAPIE accepts only 'lac' for a binary target); use scores=['lac'] or leave `scores` unset."
        )
    return list(scores)
