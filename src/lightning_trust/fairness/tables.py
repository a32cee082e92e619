"""From confusion count tables to fairness numbers: per-group metrics, disparities, intervals, flags.

Each number is computed from counts with the formula fairlearn's ``MetricFrame`` (and the
scikit-learn functions it calls) applies to the samples, in the same float64 operations, so
the results equal ``MetricFrame`` exactly. Empty denominators follow fairlearn: a group with no
positives has TPR 0.0 (scikit-learn's ``zero_division`` default for precision, recall and F1),
so a disparity is never smaller than fairlearn's; those cells are flagged. A ratio whose groups
are all 0 is 0/0: NaN, as in fairlearn, and flagged; the worst over entries or classes is NaN
when any part is NaN, so a standard or limit on it is not met.

Intervals: the ``ci_quantiles`` of each number over the Poisson-bootstrap replicate tables.

Example:
    >>> import numpy as np
    >>> table = np.array([[[5, 1], [0, 0]], [[2, 2], [1, 3]]])  # 2 groups, [true][pred]; group 0 has no positives
    >>> values, empty = group_rates(table)
    >>> values["true_positive_rate"].tolist(), empty["true_positive_rate"].tolist()
    ([0.0, 0.75], [True, False])
    >>> {k: round(v, 4) for k, v in summaries(values, table.sum((1, 2)) > 0).items()}["equalized_odds_difference"]
    0.75
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch

from lightning_trust.fairness.counts import Layout
from lightning_trust.fairness.groups import SUMMARIES, UNDEFINED_REASON, entry_name, worst

__all__ = ["binary_table", "count_arrays", "disparity_summary", "fairness_results", "group_rates", "summaries"]


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` in float64, 0.0 where ``den == 0`` (fairlearn's and scikit-learn's convention)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den > 0)
    return out


def binary_table(table: np.ndarray, cls: Optional[int]) -> np.ndarray:
    """``[..., G, C, C]`` -> the ``[..., G, 2, 2]`` table of ``cls`` one-vs-rest (``None``: as is)."""
    if cls is None:
        return table
    tp = table[..., cls, cls]
    fn = table[..., cls, :].sum(-1) - tp
    fp = table[..., :, cls].sum(-1) - tp
    tn = table.sum((-1, -2)) - tp - fn - fp
    return np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], -2)


def group_rates(table: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every metric of :data:`~lightning_trust.fairness.groups.METRICS` per group of a ``[..., G, 2, 2]``
    table, and where each one's denominator is empty."""
    tn, fp, fn, tp = (table[..., i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    n, pos, neg, sel = tn + fp + fn + tp, tp + fn, tn + fp, tp + fp
    tpr, tnr = _div(tp, pos), _div(tn, neg)
    balanced = np.where((pos > 0) & (neg > 0), (tnr + tpr) / 2, np.where(pos > 0, tpr, tnr))
    values = {
        "accuracy": _div(tp + tn, n),
        "balanced_accuracy": balanced,
        "selection_rate": _div(sel, n),
        "true_positive_rate": tpr,
        "false_positive_rate": _div(fp, neg),
        "false_negative_rate": _div(fn, pos),
        "precision": _div(tp, sel),
        "recall": tpr,
        # scikit-learn: (1 + beta^2) tp / (beta^2 (tp + fn) + (tp + fp)) with beta = 1
        "f1": _div(2.0 * tp, 1.0 * pos + sel),
        "count": n.astype(np.float64),
    }
    empty = {
        "true_positive_rate": pos == 0,
        "false_negative_rate": pos == 0,
        "recall": pos == 0,
        "false_positive_rate": neg == 0,
        "precision": sel == 0,
        "f1": pos + sel == 0,
    }
    return values, empty


def _spread(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MetricFrame's ``difference()`` (max - min) and ``ratio()`` (min / max) over the present groups."""
    high = np.where(present, values, -np.inf).max(-1)
    low = np.where(present, values, np.inf).min(-1)
    some = present.any(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(some, high - low, np.nan), np.where(some, low / high, np.nan)


def summaries(values: Mapping[str, np.ndarray], present: np.ndarray) -> dict[str, Any]:
    """The six disparity summaries as fairlearn's functions of the same names compute them."""
    dp_diff, dp_ratio = _spread(values["selection_rate"], present)
    tpr_diff, tpr_ratio = _spread(values["true_positive_rate"], present)
    fpr_diff, fpr_ratio = _spread(values["false_positive_rate"], present)
    # fairlearn: max() / min() of the Series (tpr, fpr): Python's max keeps tpr unless fpr is larger
    out = {
        "demographic_parity_difference": dp_diff,
        "demographic_parity_ratio": dp_ratio,
        "equalized_odds_difference": np.where(fpr_diff > tpr_diff, fpr_diff, tpr_diff),
        "equalized_odds_ratio": np.where(fpr_ratio < tpr_ratio, fpr_ratio, tpr_ratio),
        "equal_opportunity_difference": tpr_diff,
        "equal_opportunity_ratio": tpr_ratio,
        "true_positive_rate_difference": tpr_diff,
        "false_positive_rate_difference": fpr_diff,
    }
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


def _quantiles(samples: np.ndarray, q: Sequence[float]) -> list[float]:
    finite = samples[np.isfinite(samples)]
    return [float(v) for v in np.quantile(finite, list(q))] if finite.size else [math.nan, math.nan]


def _labels(
    layout: Layout, entry: int, group: int, names: Mapping[str, Optional[list[str]]]
) -> tuple[tuple[str, ...], int, str, str]:
    """A group's names per column (MetricFrame's sort key), its cell, table label (``Female,White``)
    and log name (``sex=Female,race=White``)."""
    parts = []
    for column_index, code in zip(layout.entries[entry], layout.unravel(entry, group)):
        column = layout.columns[column_index]
        known = names.get(column)
        parts.append((column, str(known[code]) if known and code < len(known) else str(code)))
    key = tuple(p[1] for p in parts)
    return key, group, ",".join(key), ",".join(f"{c}={v}" for c, v in parts)


def _part(
    table: np.ndarray,
    replicates: Optional[np.ndarray],
    groups: list[tuple[int, str, str]],
    metrics: Sequence[str],
    ci_quantiles: Sequence[float],
    min_group_size: int,
) -> dict[str, Any]:
    """One entry (and class): summaries (+ ``*_ci``), overall, by_group and flags."""
    cells = [g for g, _, _ in groups]
    table = table[cells]
    values, empty = group_rates(table)
    present = np.ones(len(cells), dtype=bool)
    out: dict[str, Any] = summaries(values, present)
    overall, _ = group_rates(table.sum(0))
    out["overall"] = {m: float(overall[m]) for m in metrics}
    rep_values: Optional[dict[str, np.ndarray]] = None
    if replicates is not None:
        reps = replicates[:, cells]
        rep_values, _ = group_rates(reps)
        rep_present = reps.sum((-1, -2)) > 0
        rep_values = {m: np.where(rep_present, v, np.nan) for m, v in rep_values.items()}
        for s, samples in summaries(rep_values, rep_present).items():
            out[f"{s}_ci"] = _quantiles(np.asarray(samples), ci_quantiles)
        rep_overall, _ = group_rates(reps.sum(1))
        out["overall_ci"] = {m: _quantiles(rep_overall[m], ci_quantiles) for m in metrics}
    by_group: dict[str, dict[str, Any]] = {}
    flags: list[dict[str, Any]] = []
    for i, (_, label, log_name) in enumerate(groups):
        size = int(values["count"][i])
        cell: dict[str, Any] = {m: float(values[m][i]) for m in metrics}
        cell["count"] = size
        if rep_values is not None:
            for m in metrics:
                cell[f"{m}_ci"] = _quantiles(rep_values[m][:, i], ci_quantiles)
        cell["small"] = size < min_group_size
        if cell["small"]:
            flags.append(
                {"group": label, "metric": "count", "reason": f"{size} samples < min_group_size {min_group_size}"}
            )
        for m in dict.fromkeys([*metrics, "true_positive_rate", "false_positive_rate"]):
            if m in empty and bool(empty[m][i]):
                reason = f"{UNDEFINED_REASON[m]}: fairlearn's value {float(values[m][i])} is reported"
                flags.append({"group": label, "metric": m, "reason": reason})
        cell["log_name"] = log_name
        by_group[label] = cell
    for s in SUMMARIES:
        if math.isnan(out[s]):
            flags.append(
                {"group": "(all)", "metric": s, "reason": "0/0: every group's rate is 0 (NaN, as in fairlearn)"}
            )
    out["by_group"], out["flags"] = by_group, flags
    return out


def fairness_results(
    counts: np.ndarray,
    replicates: Optional[np.ndarray],
    layout: Layout,
    names: Mapping[str, Optional[list[str]]],
    metrics: Sequence[str],
    class_names: Optional[Sequence[str]] = None,
    ci_quantiles: Sequence[float] = (0.025, 0.975),
    min_group_size: int = 0,
) -> dict[str, Any]:
    """Every entry's numbers from the count tables, and the worst case over entries and classes.

    Binary tables (``num_classes == 2``) are read as they are; multiclass ones class by class,
    one-vs-rest, with per-class numbers under ``classes``.
    """
    binary = layout.num_classes <= 2
    classes: list[Optional[int]] = [None] if binary else list(range(layout.num_classes))

    def class_label(c: int) -> str:
        return str(class_names[c]) if class_names and c < len(class_names) else str(c)

    tables = layout.tables(counts)
    rep_tables = layout.tables(replicates) if replicates is not None else [None] * len(tables)
    result: dict[str, Any] = {"num_samples": int(tables[0].sum()), "num_classes": int(layout.num_classes)}
    by_feature: dict[str, Any] = {}
    by_group: dict[str, Any] = {}
    flags: list[dict[str, Any]] = []
    overall: dict[str, Any] = {}
    for e, (table, reps) in enumerate(zip(tables, rep_tables)):
        name = entry_name([layout.columns[c] for c in layout.entries[e]])
        present = np.flatnonzero(table.sum((-1, -2)) > 0)
        groups = [g[1:] for g in sorted(_labels(layout, e, int(g), names) for g in present)]
        per_class: dict[str, Any] = {}
        for c in classes:
            bt = binary_table(table, c)
            br = binary_table(reps, c) if reps is not None else None
            part = _part(bt, br, groups, metrics, ci_quantiles, min_group_size)
            for flag in part.pop("flags"):
                flags.append({"feature": name, **({} if c is None else {"class": class_label(c)}), **flag})
            per_class["" if c is None else class_label(c)] = part
        if binary:
            part = per_class[""]
            by_group[name] = part.pop("by_group")
            overall = part.pop("overall")
            if "overall_ci" in part:
                result["overall_ci"] = part.pop("overall_ci")
            by_feature[name] = part
        else:
            by_group[name] = {k: v.pop("by_group") for k, v in per_class.items()}
            overall = {k: v.pop("overall") for k, v in per_class.items()}
            entry: dict[str, Any] = {"worst_class": {}}
            for s in SUMMARIES:
                values = {k: v[s] for k, v in per_class.items()}
                entry[s] = worst(s, list(values.values()))
                entry["worst_class"][s] = _argworst(s, values)
            entry["classes"] = per_class
            by_feature[name] = entry
    for s in SUMMARIES:
        result[s] = worst(s, [part[s] for part in by_feature.values()])
    result["worst_feature"] = {s: _argworst(s, {n: p[s] for n, p in by_feature.items()}) for s in SUMMARIES}
    result.update(overall=overall, by_feature=by_feature, by_group=by_group, flags=flags)
    return result


def _argworst(summary: str, values: Mapping[str, float]) -> Optional[str]:
    target = worst(summary, list(values.values()))
    for key, value in values.items():
        if value == target or (math.isnan(target) and math.isnan(value)):
            return key
    return None


def count_arrays(layout: Layout, y_true: Any, y_pred: Any, codes: Any) -> np.ndarray:
    """The flat count vector of per-sample arrays (what :class:`GroupCounts` sums batch by batch)."""
    y = torch.as_tensor(np.asarray(y_true)).long().reshape(-1)
    p = torch.as_tensor(np.asarray(y_pred)).long().reshape(-1)
    g = torch.as_tensor(np.asarray(codes)).long().reshape(len(y), -1)
    return np.bincount(layout.index(y, p, g).reshape(-1).numpy(), minlength=layout.size + 1)


def disparity_summary(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Accuracy, selection rate and the six disparity summaries of 0/1 predictions by group label."""
    labels, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    layout = Layout(("group",), (len(labels),), ((0,),), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = fairness_results(
            count_arrays(layout, y_true, y_pred, codes), None, layout, {"group": list(labels)},
            ["accuracy", "selection_rate"],
        )  # fmt: skip
    return {**results["overall"], **{s: results[s] for s in SUMMARIES}}
