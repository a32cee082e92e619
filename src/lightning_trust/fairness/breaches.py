"""Declared fairness limits in :class:`~lightning_trust.fairness.FairnessMetrics`: which summaries
breach them, the warnings (once per condition and run) and the failure with ``action="fail"``.

Example:
    >>> results = {"stage": "validation", "epoch": 0, "step": 10, "demographic_parity_difference": 0.3,
    ...            "worst_feature": {"demographic_parity_difference": "sex"}}
    >>> found = find_breaches(results, {"demographic_parity_difference": 0.1}, breaches_limit)
    >>> [(b["summary"], b["feature"]) for b in found]
    [('demographic_parity_difference', 'sex')]
    >>> raise_breaches("validation", found)
    Traceback (most recent call last):
    ...
    lightning_trust.fairness.breaches.FairnessBreachError: FairnessMetrics(action='fail'): 1 breach(es) during validation: demographic_parity_difference=0.3000 (limit 0.1, epoch 0). Mitigate (FairnessPenalty / ThresholdOptimizer) or revise `thresholds`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lightning_trust.core.output import warn_once
from lightning_trust.fairness.groups import is_ratio

__all__ = ["FairnessBreachError", "breaches_limit", "find_breaches", "raise_breaches", "warn_results"]


class FairnessBreachError(RuntimeError):
    """A declared fairness limit was breached and ``action="fail"``."""


def breaches_limit(summary: str, value: float, limit: float) -> bool:
    """Whether ``value`` of ``summary`` breaches ``limit``: a difference above it, a ratio below
    it, or an undefined (NaN) value."""
    return math.isnan(value) or (value < limit if is_ratio(summary) else value > limit)


def find_breaches(
    results: Mapping[str, Any], thresholds: Mapping[str, float], breached: Callable[[str, float, float], bool]
) -> list[dict[str, Any]]:
    """Every limit of ``thresholds`` that the epoch's ``results`` breach by the rule ``breached``."""
    found = []
    for summary, limit in thresholds.items():
        value = results[summary]
        if not breached(summary, value, limit):
            continue
        found.append({
            "stage": results["stage"],
            "epoch": results["epoch"],
            "step": results["step"],
            "summary": summary,
            "value": value,
            "limit": limit,
            "feature": results["worst_feature"].get(summary),
            "undefined": math.isnan(value),
        })  # fmt: skip
    return found


def warn_results(
    owner: object, stage: str, prefix: str, results: Mapping[str, Any], breaches: list[dict[str, Any]]
) -> None:
    """One warning per condition and run (flagged groups, each breached summary) for ``owner``;
    every epoch's numbers are logged under ``prefix``."""
    if results["flags"]:
        first = results["flags"][0]
        warn_once(
            owner,
            f"flags/{stage}",
            f"{type(owner).__name__} ({stage}): {len(results['flags'])} flagged group number(s), e.g. "
            f"{first['feature']} group {first['group']!r}: {first['metric']} ({first['reason']}). "
            f"See report()['flags']; the count is logged every epoch as {prefix}/flagged.",
        )
    for breach in breaches:
        summary, value, limit = breach["summary"], breach["value"], breach["limit"]
        relation = (
            "is undefined (NaN)"
            if breach["undefined"]
            else f"= {value:.4f} {'<' if is_ratio(summary) else '>'} limit {limit}"
        )
        warn_once(
            owner,
            f"breach/{stage}/{summary}",
            f"Fairness limit breached ({stage}, epoch {breach['epoch']}): {summary} {relation} (worst feature: "
            f"{breach['feature']}). Warned once; every epoch's value is logged as {prefix}/{summary} and the "
            "breaches in report()['breaches'].",
        )


def raise_breaches(stage: str, breaches: list[dict[str, Any]]) -> None:
    """Raise :class:`FairnessBreachError` naming the ``breaches`` of ``stage``, if there are any."""
    breaches = [b for b in breaches if b["stage"] == stage]
    if breaches:
        lines = "; ".join(f"{b['summary']}={b['value']:.4f} (limit {b['limit']}, epoch {b['epoch']})" for b in breaches)
        raise FairnessBreachError(
            f"FairnessMetrics(action='fail'): {len(breaches)} breach(es) during {stage}: {lines}. "
            "Mitigate (FairnessPenalty / ThresholdOptimizer) or revise `thresholds`."
        )
