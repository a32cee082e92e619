"""The evaluation's figures: a bar chart per metric over the domains, a reliability diagram per domain.

Example:
    >>> fig = bar_chart("accuracy", {"a": {"accuracy": 0.9}, "b": {"accuracy": 0.6}}, ["a"], reference=0.9)
    >>> [label.get_text() for label in fig.axes[0].get_xticklabels()]
    ['a', 'b']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_trust.core.output import DeferredFigures, new_figure, save_figure
from lightning_trust.evaluation.domains import safe_name
from lightning_trust.evaluation.summary import has_value

__all__ = ["bar_chart", "defer_figures", "draw_figures", "figure_paths", "reliability_diagram"]


def figure_paths(folder: Path, result: Mapping[str, Any], metrics: Sequence[str], suffix: str) -> dict[str, str]:
    """``{figure name: path}`` of the figures :func:`draw_figures` writes for ``result``."""
    paths = {f"domain_{m}{suffix}": str(folder / f"domain_{m}{suffix}.png") for m in metrics}
    for name in result.get("reliability", {}):
        paths[f"reliability_{safe_name(name)}{suffix}"] = str(folder / f"reliability_{safe_name(name)}{suffix}.png")
    return paths


def defer_figures(
    owed: DeferredFigures, when: str, trainer: Any, folder: Path, result: Mapping[str, Any], metrics: Sequence[str],
    in_domain: Sequence[str], stage: str, drawn: dict[str, str],
) -> None:  # fmt: skip
    """Owe ``result``'s figures (:func:`draw_figures`) to ``owed``, drawn when the report is read
    (``when="report"``) or now (``"stage_end"``); their paths go into ``drawn`` once drawn."""
    suffix = "" if stage == "validate" else "_test"
    paths = figure_paths(folder, result, metrics, suffix)

    def draw() -> None:
        draw_figures(trainer, folder, result, metrics, list(in_domain), suffix)
        drawn.update(paths)

    owed.defer(stage, draw)
    if when == "stage_end":
        owed.draw()


@rank_zero_only
def draw_figures(
    trainer: Any, folder: Path, result: Mapping[str, Any], metrics: Sequence[str], in_domain: Sequence[str], suffix: str
) -> None:
    """Draw a bar chart per metric and a reliability diagram per domain with calibration bins (rank zero)."""
    for metric in metrics:
        reference = result.get("in_domain", {}).get(metric)
        fig = bar_chart(metric, result["per_domain"], in_domain, reference)
        save_figure(trainer, fig, folder / f"domain_{metric}{suffix}.png", tag=f"evaluation/domain_{metric}{suffix}")
    for name, bins in result.get("reliability", {}).items():
        ece = result["per_domain"][name].get("ece")
        fig = reliability_diagram(name, bins["accuracy"], bins["confidence"], bins["proportion"], ece)
        tag = f"evaluation/reliability_{safe_name(name)}{suffix}"
        save_figure(trainer, fig, folder / f"reliability_{safe_name(name)}{suffix}.png", tag=tag)


def bar_chart(
    metric: str,
    per_domain: Mapping[str, Mapping[str, Optional[float]]],
    in_domain: Sequence[str],
    reference: Optional[float],
) -> Any:
    """A bar per domain (in-domain ones highlighted) with a dashed line at the in-domain value."""
    names = [d for d, v in per_domain.items() if has_value(v.get(metric))]
    values = [float(per_domain[d][metric]) for d in names]  # type: ignore[arg-type]
    fig = new_figure(figsize=(max(4.0, 0.45 * len(names) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue" if d in in_domain else "tab:orange" for d in names]
    ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60 if len(names) > 6 else 20, ha="right", fontsize=8)
    if reference is not None and has_value(reference):
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"in-domain {reference:.3f}")
        ax.legend(loc="best", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per domain (blue: in-domain, orange: out-of-domain)", fontsize=9)
    return fig


def reliability_diagram(domain: str, accuracy: Sequence[float], confidence: Sequence[float],
                        proportion: Sequence[float], ece: Optional[float]) -> Any:  # fmt: skip
    """Accuracy vs confidence per bin (bars) against the diagonal, with the bin weights below."""
    n = len(accuracy)
    width = 1.0 / n
    centers = [(i + 0.5) * width for i in range(n)]
    fig = new_figure(figsize=(3.8, 4.4))
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.35)
    ax, ax2 = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    used = [i for i in range(n) if proportion[i] > 0]
    ax.bar([centers[i] for i in used], [accuracy[i] for i in used], width=width, edgecolor="black",
           color="tab:blue", label="accuracy")  # fmt: skip
    ax.bar([centers[i] for i in used], [confidence[i] - accuracy[i] for i in used], bottom=[accuracy[i] for i in used],
           width=width, color="tab:red", alpha=0.3, label="gap")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{domain}: ECE {ece:.3f}" if ece is not None and has_value(ece) else domain, fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax2.bar(centers, list(proportion), width=width, color="gray")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("share")
    return fig
