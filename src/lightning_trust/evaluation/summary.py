"""Summaries over domains (average, weighted average, worst, in-domain vs OOD gap) and their tables.

Example:
    >>> s = summarize({"a": {"accuracy": 0.9}, "b": {"accuracy": 0.6}}, {"a": 30, "b": 10},
    ...               higher_is_better={"accuracy": True}, in_domain=["a"])
    >>> s["worst"]["accuracy"], s["worst_domain"]["accuracy"], round(s["ood_gap"]["accuracy"], 2)
    (0.6, 'b', 0.3)
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["has_value", "summarize", "write_tables"]


def _mean(values: Sequence[float], weights: Optional[Sequence[float]] = None) -> Optional[float]:
    if not values:
        return None
    if weights is None:
        return float(sum(values) / len(values))
    total = float(sum(weights))
    return float(sum(v * w for v, w in zip(values, weights)) / total) if total > 0 else None


def summarize(
    per_domain: Mapping[str, Mapping[str, Optional[float]]],
    sizes: Mapping[str, int],
    higher_is_better: Mapping[str, bool],
    in_domain: Optional[Sequence[str]] = None,
) -> dict[str, dict[str, Any]]:
    """Per-metric summaries over the domains that have a value (empty domains are left out).

    * ``average``: unweighted mean over domains; ``weighted_average``: weighted by domain size
      (equal to the pooled value for mean-decomposable metrics such as accuracy and nll);
    * ``worst`` / ``worst_domain``: the worst value and its domain (min when higher is better);
    * ``in_domain`` / ``ood``: unweighted means over in-domain and out-of-domain domains, also
      ``in_domain_weighted`` / ``ood_weighted``;
    * ``ood_gap``: how much worse OOD is than in-domain, so positive = worse out of domain
      (``in_domain - ood`` when higher is better, ``ood - in_domain`` otherwise).
    """
    in_set = set(in_domain or [])
    out: dict[str, dict[str, Any]] = {
        k: {}
        for k in ("average", "weighted_average", "worst", "worst_domain", "best", "best_domain", "in_domain",
                  "in_domain_weighted", "ood", "ood_weighted", "ood_gap")
    }  # fmt: skip
    for metric, higher in higher_is_better.items():
        rows = [
            (d, float(v[metric] or 0.0), sizes.get(d, 0)) for d, v in per_domain.items() if has_value(v.get(metric))
        ]
        if not rows:
            continue
        values = [v for _, v, _ in rows]
        weights = [n for _, _, n in rows]
        out["average"][metric] = _mean(values)
        out["weighted_average"][metric] = _mean(values, weights)
        pick_worst = min if higher else max
        worst = pick_worst(rows, key=lambda r: r[1])
        best = (max if higher else min)(rows, key=lambda r: r[1])
        out["worst"][metric], out["worst_domain"][metric] = worst[1], worst[0]
        out["best"][metric], out["best_domain"][metric] = best[1], best[0]
        if in_set:
            ind = [r for r in rows if r[0] in in_set]
            ood = [r for r in rows if r[0] not in in_set]
            if ind:
                out["in_domain"][metric] = _mean([r[1] for r in ind])
                out["in_domain_weighted"][metric] = _mean([r[1] for r in ind], [r[2] for r in ind])
            if ood:
                out["ood"][metric] = _mean([r[1] for r in ood])
                out["ood_weighted"][metric] = _mean([r[1] for r in ood], [r[2] for r in ood])
            if ind and ood:
                gap = out["in_domain"][metric] - out["ood"][metric]
                out["ood_gap"][metric] = gap if higher else -gap
    return out


def has_value(value: Any) -> bool:
    """Whether ``value`` is a number (not NaN, not ``None``)."""
    return isinstance(value, (int, float)) and not math.isnan(value)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if has_value(value) else ("" if value is None else str(value))


def write_tables(
    path_stem: Path,
    per_domain: Mapping[str, Mapping[str, Optional[float]]],
    sizes: Mapping[str, int],
    metrics: Sequence[str],
    in_domain: Sequence[str],
    summaries: Mapping[str, Mapping[str, Any]],
) -> dict[str, str]:
    """Write ``<stem>.csv`` and ``<stem>.md`` (one row per domain, then the summaries); returns their paths."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    header = ["domain", "split", "samples", *metrics]
    rows: list[list[str]] = []
    for domain, values in per_domain.items():
        split = "in-domain" if domain in in_domain else "ood"
        rows.append([domain, split, str(sizes.get(domain, 0)), *(_fmt(values.get(m)) for m in metrics)])
    summary_rows = [
        [f"**{key}**", "", "", *(_fmt(summaries.get(key, {}).get(m)) for m in metrics)]
        for key in ("average", "weighted_average", "worst", "worst_domain", "in_domain", "ood", "ood_gap")
        if summaries.get(key)
    ]
    csv_path, md_path = path_stem.with_suffix(".csv"), path_stem.with_suffix(".md")
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
        writer.writerows([[r[0].strip("*"), *r[1:]] for r in summary_rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows + summary_rows]
    md_path.write_text("\n".join(lines) + "\n")
    return {"csv": str(csv_path), "markdown": str(md_path)}
