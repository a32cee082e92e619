"""The per-group results as a table: CSV rows (one per entry, class and group) and a bar chart
per metric.

Example:
    >>> results = {"num_classes": 2, "overall": {"selection_rate": 0.5},
    ...            "by_group": {"sex": {"F": {"selection_rate": 0.25, "count": 4, "small": False}}}}
    >>> [(r["group"], r["selection_rate"]) for r in table_rows(results, ["selection_rate"])]
    [('F', 0.25), ('(overall)', 0.5)]
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_trust.core.output import new_figure

__all__ = ["group_bar_figure", "table_rows", "write_table_csv"]


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
