"""The uncertainty evaluation's figures, drawn when the report is read: coverage per group of each
side column (one bar per score, the target as a line) and reliability curves per group before
and after temperature scaling.

Example:
    >>> cells = {"sex=F": {"coverage": 0.91}, "sex=M": {"coverage": 0.88}}
    >>> fig = coverage_figure("sex", {"lac": {"cells": cells}}, ["sex=F", "sex=M"], 0.9)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['F', 'M']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_trust.core.output import new_figure, save_figure
from lightning_trust.evaluation.domains import safe_name

__all__ = ["coverage_figure", "draw_uncertainty_figures", "reliability_figure", "uncertainty_figure_paths"]


def _label(cell: str) -> str:
    return cell.partition("=")[2] or cell


def coverage_figure(column: str, conformal: Mapping[str, Any], cells: Sequence[str], target: float) -> Any:
    """Coverage per group of ``column``: one bar per score, a dashed line at the target."""
    fig = new_figure(figsize=(max(4.0, 0.6 * len(cells) * max(1, len(conformal)) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(conformal))
    for i, (score, values) in enumerate(conformal.items()):
        heights = [values["cells"][c]["coverage"] or 0.0 for c in cells]
        ax.bar([j + i * width for j in range(len(cells))], heights, width=width, label=score)
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))])
    ax.set_xticklabels([_label(c) for c in cells], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(max(0.0, target - 0.3), 1.0)
    ax.set_ylabel("coverage")
    ax.set_title(f"Conformal coverage by {column}", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def reliability_figure(column: str, bins: Mapping[str, Mapping[str, Any]], cells: Sequence[str]) -> Any:
    """Accuracy against confidence per group of ``column`` (bins with samples), before (dashed) and
    after (solid) temperature scaling, against the diagonal."""
    fig = new_figure(figsize=(4.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="gray", linewidth=1)
    for i, cell in enumerate(cells):
        color = f"C{i % 10}"
        for phase, style in (("before", "--"), ("after", "-")):
            b = bins.get(cell, {}).get(phase)
            if not b:
                continue
            used = [k for k, n in enumerate(b["count"]) if n > 0]
            ax.plot([b["confidence"][k] for k in used], [b["accuracy"][k] for k in used], style, color=color,
                    marker="o", markersize=3, label=f"{_label(cell)} ({phase})")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability by {column} (dashed: before, solid: after scaling)", fontsize=8)
    ax.legend(loc="upper left", fontsize=6)
    return fig


def uncertainty_figure_paths(folder: Path, columns: Sequence[str], stage: str) -> dict[str, str]:
    """``{figure name: path}`` of the figures drawn for ``stage``."""
    paths: dict[str, str] = {}
    for column in columns:
        for kind in ("coverage", "reliability"):
            name = f"{kind}_by_{safe_name(column)}_{stage}"
            paths[name] = str(folder / f"{name}.png")
    return paths


@rank_zero_only
def draw_uncertainty_figures(trainer: Any, folder: Path, result: Mapping[str, Any], columns: Sequence[str],
                             cells_of: Mapping[str, Sequence[str]], stage: str) -> None:  # fmt: skip
    """Draw every figure of :func:`uncertainty_figure_paths` (rank zero)."""
    for column in columns:
        cells = list(cells_of[column])
        target = float(result["conformal"]["confidence_level"])
        name = f"coverage_by_{safe_name(column)}_{stage}"
        save_figure(trainer, coverage_figure(column, result["conformal"]["scores"], cells, target),
                    folder / f"{name}.png", tag=f"uncertainty/{name}")  # fmt: skip
        name = f"reliability_by_{safe_name(column)}_{stage}"
        save_figure(trainer, reliability_figure(column, result["calibration"]["reliability"], cells),
                    folder / f"{name}.png", tag=f"uncertainty/{name}")  # fmt: skip
