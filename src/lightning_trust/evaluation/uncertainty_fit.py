"""The calibration of an uncertainty evaluation: the gathered calibration rows in their canonical
order, the temperature, and the conformal predictors on raw or temperature-scaled probabilities.

Rows gathered from every process are sorted by their content key
(:mod:`~lightning_trust.evaluation.sample_keys`), so the temperature fit, MAPIE's randomized scores
and RAPS's split see the same rows in the same order under any sharding: a DDP run calibrates
exactly as one process on the same data.

``conformal_on`` chooses the probabilities the sets are built from: ``"raw"`` (the softmax of the
logits; the default: the score function does not depend on the calibration samples, so the
split-conformal guarantee holds exactly) or ``"calibrated"`` (``softmax(logits / T)`` with the
temperature fitted on the same calibration samples, as the RAPS authors' reference code does; the
one fitted scalar makes the guarantee approximate).

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> conformal_probabilities(logits, 2.0, "calibrated").round(3).tolist()
    [[0.731, 0.269], [0.269, 0.731]]
    >>> conformal_probabilities(logits, 2.0, "raw").round(3).tolist()
    [[0.881, 0.119], [0.119, 0.881]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from torch import Tensor

from lightning_trust.evaluation.calibration import fit_temperature
from lightning_trust.evaluation.conformal import ConformalPredictor, min_calibration_samples

__all__ = ["canonical_order", "conformal_probabilities", "fit_calibration", "fit_predictors"]


def canonical_order(rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``rows`` sorted by their ``key`` column (stable): the same order whatever the sharding."""
    order = rows["key"].argsort(stable=True)
    return {k: v[order] for k, v in rows.items()}


def conformal_probabilities(logits: Tensor, temperature: Optional[float], conformal_on: str) -> np.ndarray:
    """The ``(n, C)`` float64 probabilities the conformal scores read."""
    scaled = (
        logits.float() / temperature if conformal_on == "calibrated" and temperature is not None else logits.float()
    )
    return scaled.softmax(dim=1).double().cpu().numpy()


def fit_calibration(rows: Mapping[str, Tensor], *, confidence_level: float, temperature_scaling: bool, epoch: int,
                    seen: int) -> dict[str, Any]:  # fmt: skip
    """The calibration of a validation pass from its gathered rows: the rows (canonical order, on
    the CPU), the temperature (or ``None``), the epoch and how many samples the split offered."""
    rows = canonical_order({k: v.cpu() for k, v in rows.items()})
    need = min_calibration_samples(confidence_level)
    if len(rows["target"]) < need:
        raise RuntimeError(
            f"UncertaintyEvaluation: {len(rows['target'])} calibration samples, fewer than the {need} a conformal "
            f"set at confidence_level={confidence_level} needs; raise `calibration_fraction` or validate on more data."
        )
    temperature = fit_temperature(rows["logits"], rows["target"]) if temperature_scaling else None
    return {"rows": rows, "temperature": temperature, "epoch": epoch, "seen": seen}


def fit_predictors(
    calibration: Mapping[str, Any], scores: Sequence[str], *, confidence_level: float, seed: int,
    include_last_label: Union[bool, str], conformal_on: str, mondrian_column: Optional[int],
) -> dict[str, ConformalPredictor]:  # fmt: skip
    """One MAPIE predictor per score, conformalized on the calibration rows' probabilities (per
    group of code column ``mondrian_column`` when given)."""
    rows = calibration["rows"]
    probs = conformal_probabilities(rows["logits"], calibration["temperature"], conformal_on)
    labels = rows["target"].numpy()
    groups = None if mondrian_column is None else rows["codes"][:, mondrian_column].numpy()
    return {
        s: ConformalPredictor(s, confidence_level, probs.shape[1], seed, include_last_label).fit(probs, labels, groups)
        for s in scores
    }
