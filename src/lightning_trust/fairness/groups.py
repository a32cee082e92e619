"""The vocabulary of group fairness: metric functions by name, disparity summaries, sensitive
feature entries, and the groups' codes, names and labels.

Example:
    >>> parse_entries(["sex", "sex*race"])
    [['sex'], ['sex', 'race']]
    >>> decode(np.array([0, 1, 5]), ["Female", "Male"]).tolist()
    ['Female', 'Male', '5']
    >>> worst("demographic_parity_ratio", [0.9, 0.7]), worst("demographic_parity_ratio", [0.9, float("nan")])
    (0.7, nan)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import torch
from fairlearn.metrics import false_negative_rate, false_positive_rate, selection_rate, true_positive_rate
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score
from torch import Tensor

from lightning_trust.core.batch import BatchContract

__all__ = [
    "INTERSECTION",
    "METRICS",
    "REQUIRED_METRICS",
    "SUMMARIES",
    "UNDEFINED_REASON",
    "FeatureEntry",
    "base_columns",
    "decode",
    "entry_name",
    "group_label",
    "group_labels",
    "group_names",
    "is_ratio",
    "log_group",
    "parse_entries",
    "read_codes",
    "sensitive_frame",
    "single_entry",
    "validate_metrics",
    "worst",
]

FeatureEntry = Union[str, list[str]]
INTERSECTION = "*"  # "sex*race" names the intersection of sex and race


def _count(y_true: Any, y_pred: Any, sample_weight: Any = None) -> int:
    """fairlearn's ``count`` (samples in the group), also for weighted (compressed) rows."""
    return int(len(y_true) if sample_weight is None else np.sum(sample_weight))


#: The per-group metrics by name, as the reference functions MetricFrame takes: Fairlearn's and
#: scikit-learn's own (empty denominators give their 0.0; ``zero_division=0.0`` is scikit-learn's
#: default value, without its warning). The callback computes the same numbers from counts
#: (:mod:`~lightning_trust.fairness.tables`) and flags every empty denominator.
METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "selection_rate": selection_rate,
    "true_positive_rate": true_positive_rate,
    "false_positive_rate": false_positive_rate,
    "false_negative_rate": false_negative_rate,
    "precision": functools.partial(precision_score, zero_division=0.0),
    "recall": functools.partial(recall_score, zero_division=0.0),
    "f1": functools.partial(f1_score, zero_division=0.0),
    "count": _count,
}
#: Why a metric has an empty denominator in a group (used for flags).
UNDEFINED_REASON: dict[str, str] = {
    "true_positive_rate": "no positives (y_true == 1) in the group",
    "false_negative_rate": "no positives (y_true == 1) in the group",
    "recall": "no positives (y_true == 1) in the group",
    "false_positive_rate": "no negatives (y_true == 0) in the group",
    "precision": "no predicted positives in the group",
    "f1": "no positives and no predicted positives in the group",
}
#: The disparity summaries, as fairlearn's functions of the same names compute them.
SUMMARIES: tuple[str, ...] = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equalized_odds_ratio",
    "equal_opportunity_difference",
    "equal_opportunity_ratio",
)
#: The metrics every table holds (summaries and group sizes need them), besides the requested ones.
REQUIRED_METRICS: tuple[str, ...] = ("selection_rate", "true_positive_rate", "false_positive_rate", "count")


def is_ratio(summary: str) -> bool:
    """Whether ``summary`` is a ratio (worse when smaller) rather than a difference."""
    return summary.endswith("_ratio")


def worst(summary: str, values: Sequence[float]) -> float:
    """The worst of ``values`` for ``summary``: the largest difference, the smallest ratio; NaN
    (undefined) when any value is, so a limit on it is never met by skipping a part."""
    if not values or any(v is None or math.isnan(v) for v in values):
        return float("nan")
    return min(values) if is_ratio(summary) else max(values)


def validate_metrics(metrics: Sequence[str]) -> list[str]:
    """``metrics`` as a list, refusing unknown or repeated names."""
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown fairness metric(s) {unknown}; choose from {sorted(METRICS)}.")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"`metrics` lists a metric twice: {metrics}.")
    return metrics


# sensitive feature entries -----------------------------------------------------------------------
def parse_entries(sensitive_features: Union[FeatureEntry, Sequence[FeatureEntry]]) -> list[list[str]]:
    """``"sex"`` -> ``[["sex"]]``; ``["sex", ["sex", "race"], "race*age_group"]`` -> one list per entry.

    A list entry (or a name joined with ``*``) is an intersection of several side columns.
    """
    if isinstance(sensitive_features, str):
        sensitive_features = [sensitive_features]
    if not isinstance(sensitive_features, Sequence) or not sensitive_features:
        raise ValueError(
            "`sensitive_features` must name at least one side column, e.g. ['sex', 'race', ['sex', 'race']]."
        )
    entries: list[list[str]] = []
    for entry in sensitive_features:
        columns = entry.split(INTERSECTION) if isinstance(entry, str) else list(entry)
        columns = [c.strip() for c in columns]
        if not columns or not all(isinstance(c, str) and c for c in columns):
            raise ValueError(f"Bad sensitive feature entry {entry!r}: use a column name or a list of names.")
        if len(set(columns)) != len(columns):
            raise ValueError(f"Sensitive feature entry {entry!r} repeats a column.")
        if columns in entries:
            raise ValueError(f"Sensitive feature entry {entry!r} is listed twice.")
        entries.append(columns)
    return entries


def single_entry(sensitive_feature: FeatureEntry) -> list[str]:
    """The columns of one entry: a column name, ``"a*b"``, or a list of columns (an intersection)."""
    return parse_entries([sensitive_feature] if isinstance(sensitive_feature, str) else [list(sensitive_feature)])[0]


def entry_name(columns: Sequence[str]) -> str:
    """An entry's name: ``"sex"`` or ``"sex*race"``."""
    return INTERSECTION.join(columns)


def base_columns(entries: Sequence[Sequence[str]]) -> list[str]:
    """Distinct side columns used by the entries, in first-use order."""
    seen: list[str] = []
    for columns in entries:
        for c in columns:
            if c not in seen:
                seen.append(c)
    return seen


# group codes, names and labels -------------------------------------------------------------------
def read_codes(contract: BatchContract, batch: Any, columns: Sequence[str], device: torch.device) -> Tensor:
    """The side columns of ``batch`` as an integer tensor ``[batch, len(columns)]`` on ``device``."""
    out = []
    for name in columns:
        value = contract.side(batch, name)
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value)
        if value.is_floating_point() or value.is_complex():
            raise TypeError(
                f"Side column {name!r} holds {value.dtype} values; sensitive features must be integer group "
                "codes (names come from `datamodule.categories[name]`)."
            )
        out.append(value.reshape(-1).to(device=device, dtype=torch.long))
    return torch.stack(out, dim=1)


def group_names(trainer: Any, column: str) -> Optional[list[str]]:
    """``trainer.datamodule.categories[column]`` when the datamodule names the codes."""
    categories = getattr(getattr(trainer, "datamodule", None), "categories", None)
    if isinstance(categories, Mapping) and isinstance(categories.get(column), (list, tuple)):
        return [str(n) for n in categories[column]]
    return None


def decode(codes: np.ndarray, names: Optional[Sequence[str]]) -> np.ndarray:
    """Integer codes -> group names (the code itself, as text, where no name is known)."""
    out = np.array([str(int(c)) for c in codes], dtype=object)
    if names:
        table = np.array(list(names), dtype=object)
        inside = (codes >= 0) & (codes < len(table))
        out[inside] = table[codes[inside]]
    return out


def sensitive_frame(
    codes: np.ndarray,
    columns: Sequence[str],
    all_columns: Sequence[str],
    names: Mapping[str, Optional[list[str]]],
) -> Union[pd.Series, pd.DataFrame]:
    """The ``sensitive_features`` argument of MetricFrame for one entry: named group labels."""
    decoded = {c: decode(codes[:, list(all_columns).index(c)], names.get(c)) for c in columns}
    if len(columns) == 1:
        return pd.Series(decoded[columns[0]], name=columns[0])
    return pd.DataFrame(decoded)


def group_labels(frame: Union[pd.Series, pd.DataFrame]) -> np.ndarray:
    """One group label per sample of a :func:`sensitive_frame`: ``"Female"``, or ``"Female,White"``
    for an intersection."""
    if isinstance(frame, pd.DataFrame):
        return np.array([",".join(map(str, row)) for row in frame.itertuples(index=False)], dtype=object)
    return np.asarray(frame, dtype=object)


def group_label(columns: Sequence[str], key: Any) -> str:
    """A group's name in tables and reports: ``"Female"`` or ``"Female,White"`` for an intersection."""
    if len(columns) == 1:
        return str(key[0] if isinstance(key, tuple) else key)
    return ",".join(str(k) for k in key)


def log_group(columns: Sequence[str], key: Any) -> str:
    """A group's name in logged keys: ``"sex=Female"`` or ``"sex=Female,race=White"``."""
    keys = key if isinstance(key, tuple) else (key,)
    return ",".join(f"{c}={k}" for c, k in zip(columns, keys))
