"""Fairlearn's ``MetricFrame`` read out into plain JSON: per-group tables, disparity summaries,
intervals, flags, the worst case over entries and classes, and the table's CSV rows.

Every number comes from :class:`fairlearn.metrics.MetricFrame`; this module only chooses the
functions, feeds the arrays and reads the frame out (numbers through
:func:`~lightning_trust.core.tensors.to_jsonable`).

Example:
    >>> import numpy as np, pandas as pd
    >>> y_true, y_pred = np.array([1, 0, 1, 0]), np.array([1, 1, 0, 0])
    >>> part = table(y_true, y_pred, pd.Series(["a", "a", "b", "b"], name="g"), ["g"], ["selection_rate"])
    >>> part["demographic_parity_difference"], part["by_group"]["a"]["selection_rate"]
    (1.0, 1.0)
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame

from lightning_trust.core.output import new_figure
from lightning_trust.core.tensors import to_jsonable
from lightning_trust.fairness.groups import (
    METRICS,
    REQUIRED_METRICS,
    SUMMARIES,
    UNDEFINED_REASON,
    entry_name,
    group_label,
    log_group,
    sensitive_frame,
    worst,
)

__all__ = [
    "disparity_summary",
    "fairness_results",
    "group_bar_figure",
    "metric_frame",
    "summaries_of",
    "table",
    "table_rows",
    "write_table_csv",
]


def _num(value: Any) -> float:
    """A frame cell as a float (NaN where it holds no number)."""
    try:
        return float(to_jsonable(value))
    except (TypeError, ValueError):
        return float("nan")


def metric_frame(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sensitive_features: Any,
    metrics: Sequence[str],
    n_boot: Optional[int] = None,
    ci_quantiles: Sequence[float] = (0.025, 0.975),
    random_state: Optional[int] = None,
) -> MetricFrame:
    """The MetricFrame of ``metrics`` (plus those the summaries need), with MetricFrame's bootstrap.

    Without bootstrap the samples are first compressed to their distinct (groups, y_true, y_pred)
    rows weighted by their counts: every metric here is a ratio of (weighted) confusion-matrix
    counts, which are exact integers either way, so the numbers are identical to the per-sample
    frame while MetricFrame's per-row Python work shrinks from N rows to at most 4 x groups. The
    bootstrap resamples individual samples, so it gets the per-sample frame.
    """
    names = list(dict.fromkeys([*metrics, *REQUIRED_METRICS]))
    sample_params = None
    if not n_boot:
        y_true, y_pred, sensitive_features, weights = _compress(y_true, y_pred, sensitive_features)
        sample_params = {m: {"sample_weight": weights} for m in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's undefined-metric warnings: we flag NaN ourselves
        return MetricFrame(
            metrics={m: METRICS[m] for m in names},
            y_true=y_true,
            y_pred=y_pred,
            sensitive_features=sensitive_features,
            sample_params=sample_params,
            n_boot=n_boot if n_boot else None,
            ci_quantiles=list(ci_quantiles) if n_boot else None,
            random_state=random_state if n_boot else None,
        )


def _compress(
    y_true: np.ndarray, y_pred: np.ndarray, sensitive_features: Any
) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    features = sensitive_features.to_frame() if isinstance(sensitive_features, pd.Series) else sensitive_features
    frame = features.reset_index(drop=True).assign(__y_true=np.asarray(y_true), __y_pred=np.asarray(y_pred))
    counts = frame.value_counts(sort=False).reset_index(name="__weight")
    groups = counts[list(features.columns)]
    if isinstance(sensitive_features, pd.Series):
        groups = groups[sensitive_features.name]
    return counts["__y_true"].to_numpy(), counts["__y_pred"].to_numpy(), groups, counts["__weight"].to_numpy()


def summaries_of(frame: MetricFrame) -> dict[str, float]:
    """The six disparity summaries, exactly as fairlearn's functions compute them from a frame."""
    diff, ratio = frame.difference(), frame.ratio()
    tpr_fpr_diff = [_num(diff["true_positive_rate"]), _num(diff["false_positive_rate"])]
    tpr_fpr_ratio = [_num(ratio["true_positive_rate"]), _num(ratio["false_positive_rate"])]
    return {
        "demographic_parity_difference": _num(diff["selection_rate"]),
        "demographic_parity_ratio": _num(ratio["selection_rate"]),
        # fairlearn: max(eo.difference()) / min(eo.ratio()) over (tpr, fpr), in that order
        "equalized_odds_difference": max(tpr_fpr_diff),
        "equalized_odds_ratio": min(tpr_fpr_ratio),
        "equal_opportunity_difference": _num(diff["true_positive_rate"]),
        "equal_opportunity_ratio": _num(ratio["true_positive_rate"]),
    }


def _ci_pairs(ci: Optional[list[Any]], key: Any) -> Optional[list[float]]:
    if ci is None:
        return None
    return [_num(part[key]) for part in ci]


def table(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sensitive_features: Union[pd.Series, pd.DataFrame],
    columns: Sequence[str],
    metrics: Sequence[str],
    n_boot: Optional[int] = None,
    ci_quantiles: Sequence[float] = (0.025, 0.975),
    random_state: Optional[int] = None,
    min_group_size: int = 0,
) -> dict[str, Any]:
    """One entry's results (plain JSON): summaries (+ ``*_ci``), ``overall``, ``by_group`` and flags."""
    frame = metric_frame(y_true, y_pred, sensitive_features, metrics, n_boot, ci_quantiles, random_state)
    out: dict[str, Any] = dict(summaries_of(frame))
    boot = bool(n_boot)
    if boot:
        diff_ci, ratio_ci = frame.difference_ci(), frame.ratio_ci()
        out["demographic_parity_difference_ci"] = _ci_pairs(diff_ci, "selection_rate")
        out["demographic_parity_ratio_ci"] = _ci_pairs(ratio_ci, "selection_rate")
        out["equal_opportunity_difference_ci"] = _ci_pairs(diff_ci, "true_positive_rate")
        out["equal_opportunity_ratio_ci"] = _ci_pairs(ratio_ci, "true_positive_rate")
        # equalized odds is the max of two differences; MetricFrame bootstraps each one
        out["true_positive_rate_difference_ci"] = _ci_pairs(diff_ci, "true_positive_rate")
        out["false_positive_rate_difference_ci"] = _ci_pairs(diff_ci, "false_positive_rate")
    overall = frame.overall
    out["overall"] = {m: _num(overall[m]) for m in metrics}
    if boot:
        out["overall_ci"] = {m: _ci_pairs(frame.overall_ci, m) for m in metrics}
    by_group: dict[str, dict[str, Any]] = {}
    flags: list[dict[str, Any]] = []
    group_ci = frame.by_group_ci if boot else None
    for key, row in frame.by_group.iterrows():
        label = group_label(columns, key)
        size = int(row["count"])
        cell: dict[str, Any] = {m: _num(row[m]) for m in metrics}
        cell["count"] = size
        if group_ci is not None:
            for m in metrics:
                cell[f"{m}_ci"] = [_num(part.loc[key, m]) for part in group_ci]
        small = size < min_group_size
        cell["small"] = small
        if small:
            flags.append(
                {"group": label, "metric": "count", "reason": f"{size} samples < min_group_size {min_group_size}"}
            )
        for m in dict.fromkeys([*metrics, "true_positive_rate", "false_positive_rate"]):
            if m in UNDEFINED_REASON and math.isnan(_num(row[m])):
                flags.append({"group": label, "metric": m, "reason": UNDEFINED_REASON[m]})
        cell["log_name"] = log_group(columns, key)
        by_group[label] = cell
    out["by_group"] = by_group
    out["flags"] = flags
    return out


def fairness_results(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    codes: np.ndarray,
    entries: Sequence[Sequence[str]],
    all_columns: Sequence[str],
    names: Mapping[str, Optional[list[str]]],
    metrics: Sequence[str],
    num_classes: int = 2,
    class_names: Optional[Sequence[str]] = None,
    n_boot: Optional[int] = None,
    ci_quantiles: Sequence[float] = (0.025, 0.975),
    random_state: Optional[int] = None,
    min_group_size: int = 0,
) -> dict[str, Any]:
    """All entries' MetricFrame results and the worst case over them (and over classes, one-vs-rest).

    Binary: ``y_true``/``y_pred`` are 0/1. Multiclass (``num_classes > 2``): class indices; each class
    ``c`` is scored one-vs-rest (``y == c``), per-class numbers sit under ``classes``.
    """
    binary = num_classes <= 2
    classes: list[Optional[int]] = [None] if binary else list(range(num_classes))

    def class_label(c: int) -> str:
        return str(class_names[c]) if class_names and c < len(class_names) else str(c)

    result: dict[str, Any] = {"num_samples": len(y_true), "num_classes": int(num_classes)}
    by_feature: dict[str, Any] = {}
    by_group: dict[str, Any] = {}
    flags: list[dict[str, Any]] = []
    overall: dict[str, Any] = {}
    for columns in entries:
        name = entry_name(columns)
        sf = sensitive_frame(codes, columns, all_columns, names)
        per_class: dict[str, Any] = {}
        for c in classes:
            if c is None:
                yt, yp = y_true, y_pred
            else:
                yt, yp = (y_true == c).astype(np.int64), (y_pred == c).astype(np.int64)
            part = table(yt, yp, sf, columns, metrics, n_boot, ci_quantiles, random_state, min_group_size)
            for flag in part.pop("flags"):
                flags.append({"feature": name, **({} if c is None else {"class": class_label(c)}), **flag})
            per_class["" if c is None else class_label(c)] = part
        if binary:
            part = per_class[""]
            by_group[name] = part.pop("by_group")
            overall = part.pop("overall")
            part.pop("overall_ci", None)
            by_feature[name] = part
        else:
            by_group[name] = {k: v.pop("by_group") for k, v in per_class.items()}
            overall = {k: v.pop("overall") for k, v in per_class.items()}
            entry: dict[str, Any] = {}
            for s in SUMMARIES:
                values = {k: v[s] for k, v in per_class.items()}
                entry[s] = worst(s, list(values.values()))
                entry.setdefault("worst_class", {})[s] = _argworst(s, values)
            entry["classes"] = per_class
            by_feature[name] = entry
    for s in SUMMARIES:
        values = {name: part[s] for name, part in by_feature.items()}
        result[s] = worst(s, list(values.values()))
    result["worst_feature"] = {s: _argworst(s, {n: p[s] for n, p in by_feature.items()}) for s in SUMMARIES}
    result["overall"] = overall
    result["by_feature"] = by_feature
    result["by_group"] = by_group
    result["flags"] = flags
    return result


def _argworst(summary: str, values: Mapping[str, float]) -> Optional[str]:
    target = worst(summary, list(values.values()))
    for key, value in values.items():
        if value == target:
            return key
    return None


def disparity_summary(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Accuracy, selection rate and the six disparity summaries (MetricFrame) of 0/1 predictions."""
    part = table(y_true, y_pred, pd.Series(groups, name="group"), ["group"], ["accuracy", "selection_rate"])
    return {**part["overall"], **{s: part[s] for s in SUMMARIES}}


# the CSV table and the figure ------------------------------------------------------------------------------------
def table_rows(results: Mapping[str, Any], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (entry, class, group) and an ``(overall)`` row per (entry, class)."""
    rows = []
    multiclass = results["num_classes"] > 2
    for name, groups_or_classes in results["by_group"].items():
        per_class = groups_or_classes if multiclass else {"": groups_or_classes}
        for cls, groups in per_class.items():
            overall = results["overall"][cls] if multiclass else results["overall"]
            for label, cell in [*groups.items(), ("(overall)", {**overall, "count": None, "small": None})]:
                row: dict[str, Any] = {"feature": name}
                if multiclass:
                    row["class"] = cls
                row.update(group=label, count=cell.get("count"), small=cell.get("small"))
                for m in metrics:
                    if m == "count":
                        continue
                    row[m] = cell.get(m)
                    if f"{m}_ci" in cell:
                        lo_hi = cell.get(f"{m}_ci") or [None, None]
                        row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo_hi
                rows.append(row)
    return rows


def write_table_csv(path: Path, results: Mapping[str, Any], metrics: Sequence[str]) -> None:
    """Write :func:`table_rows` as a CSV file."""
    rows = table_rows(results, metrics)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def group_bar_figure(results: Mapping[str, Any], metric: str, stage: str, min_group_size: int) -> Any:
    """Bars of ``metric`` per group, one panel per entry (the worst class for multiclass), with the
    overall value, intervals when bootstrapped, and groups under ``min_group_size`` in orange."""
    entries = list(results["by_group"])
    figure = new_figure(figsize=(4.0 * len(entries) + 1, 3.6))
    multiclass = results["num_classes"] > 2
    for i, entry in enumerate(entries):
        axis = figure.add_subplot(1, len(entries), i + 1)
        groups = results["by_group"][entry]
        overall = results["overall"]
        title = entry
        if multiclass:  # the class with the largest demographic parity difference
            worst_class = results["by_feature"][entry]["worst_class"]["demographic_parity_difference"]
            cls = worst_class or next(iter(groups))
            groups, overall, title = groups[cls], overall[cls], f"{entry} (class {cls})"
        labels = list(groups)
        values = [groups[g][metric] for g in labels]
        colors = ["tab:orange" if groups[g]["small"] else "tab:blue" for g in labels]
        positions = np.arange(len(labels))
        axis.bar(positions, values, color=colors)
        if all(f"{metric}_ci" in groups[g] for g in labels):
            lows = [v - groups[g][f"{metric}_ci"][0] for g, v in zip(labels, values)]
            highs = [groups[g][f"{metric}_ci"][1] - v for g, v in zip(labels, values)]
            axis.errorbar(positions, values, yerr=[lows, highs], fmt="none", ecolor="black", capsize=3)
        axis.axhline(overall[metric], color="tab:red", linestyle="--", label=f"overall {overall[metric]:.3f}")
        axis.set_xticks(positions)
        many = len(labels) > 3
        axis.set_xticklabels(labels, rotation=45 if many else 0, ha="right" if many else "center", fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.set_ylabel(metric)
        axis.legend(fontsize=7)
    figure.suptitle(f"{metric} by group ({stage}; orange: < {min_group_size} samples)", fontsize=10)
    return figure
