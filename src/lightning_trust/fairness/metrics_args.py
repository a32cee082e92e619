"""The arguments of :class:`~lightning_trust.fairness.FairnessMetrics`, refused early when bad.

Example:
    >>> check_metrics_args("test", 1, 0.5, "auto", None, None, None, {"demographic_parity_ratio": 0.8}, "warn", 30)
    (['test'], [0.025, 0.975], ['test'], {'demographic_parity_ratio': 0.8})
    >>> check_metrics_args("train", 1, 0.5, "auto", None, None, None, None, "warn", 30)
    Traceback (most recent call last):
    ...
    ValueError: `stages` must be 'validation' and/or 'test', got 'train'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Optional, Union

from lightning_trust.fairness.groups import SUMMARIES
from lightning_trust.fairness.predictions import check_activation

__all__ = ["DEFAULT_METRICS", "Stage", "check_figures", "check_metrics_args", "check_num_groups"]

Stage = Literal["validation", "test"]
#: The per-group metrics computed when ``metrics`` is not given.
DEFAULT_METRICS = ["accuracy", "selection_rate", "true_positive_rate", "false_positive_rate"]


def check_metrics_args(
    stages: Union[Stage, list[Stage]],
    positive_label: int,
    threshold: float,
    activation: str,
    n_boot: Optional[int],
    ci_quantiles: Optional[list[float]],
    ci_stages: Optional[list[Stage]],
    thresholds: Optional[Mapping[str, float]],
    action: str,
    min_group_size: int,
) -> tuple[list[Stage], list[float], list[Stage], dict[str, float]]:
    """Refuse bad arguments; returns the stages, the interval quantiles, the interval stages and the limits."""
    stages_list: list[Stage] = [stages] if isinstance(stages, str) else list(stages)
    if not stages_list or any(s not in ("validation", "test") for s in stages_list):
        raise ValueError(f"`stages` must be 'validation' and/or 'test', got {stages!r}.")
    if not isinstance(positive_label, int):
        raise ValueError(f"`positive_label` must be an integer class index, got {positive_label!r}.")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` is a probability threshold in [0, 1], got {threshold}.")
    check_activation(activation)
    if n_boot is not None and (not isinstance(n_boot, int) or n_boot < 1):
        raise ValueError(f"`n_boot` must be a positive integer (or None for no intervals), got {n_boot!r}.")
    ci_quantiles = [0.025, 0.975] if ci_quantiles is None else [float(q) for q in ci_quantiles]
    if len(ci_quantiles) != 2 or not 0 < ci_quantiles[0] < ci_quantiles[1] < 1:
        raise ValueError(f"`ci_quantiles` must be two increasing quantiles in (0, 1), got {ci_quantiles}.")
    ci_stages = list(stages_list if ci_stages is None else ci_stages)
    if any(s not in stages_list for s in ci_stages):
        raise ValueError(f"`ci_stages` {ci_stages} must be among `stages` {stages_list}.")
    thresholds = dict(thresholds or {})
    for summary, limit in thresholds.items():
        if summary not in SUMMARIES:
            raise ValueError(f"Unknown summary {summary!r} in `thresholds`; choose from {list(SUMMARIES)}.")
        if not isinstance(limit, (int, float)) or not 0.0 <= float(limit) <= 1.0:
            raise ValueError(f"`thresholds[{summary!r}]` must be a number in [0, 1], got {limit!r}.")
    if action not in ("warn", "stop", "fail"):
        raise ValueError(f"`action` must be 'warn', 'stop' or 'fail', got {action!r}.")
    if not isinstance(min_group_size, int) or min_group_size < 0:
        raise ValueError(f"`min_group_size` must be an integer >= 0, got {min_group_size!r}.")
    return stages_list, ci_quantiles, ci_stages, {k: float(v) for k, v in thresholds.items()}


def check_num_groups(num_groups: Optional[Mapping[str, int]]) -> dict[str, int]:
    """``num_groups`` as a dict of column -> a positive number of groups."""
    if num_groups is None:
        return {}
    if not isinstance(num_groups, Mapping):
        raise ValueError(
            f"`num_groups` maps side columns to their number of groups, e.g. {{'race': 5}}; got {num_groups!r}."
        )
    for column, count in num_groups.items():
        if not isinstance(column, str) or isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"`num_groups[{column!r}]` must be a positive integer (codes 0..N-1), got {count!r}.")
    return dict(num_groups)


def check_figures(figures: str) -> str:
    """``figures`` if it is ``report``, ``stage_end`` or ``never``."""
    if figures not in ("report", "stage_end", "never"):
        raise ValueError(f"`figures` must be 'report', 'stage_end' or 'never', got {figures!r}.")
    return figures
