"""What :class:`~lightning_trust.fairness.FairnessMetrics` publishes: each epoch's numbers through
Lightning's loggers, and at the end of a stage the CSV table, the JSON results and a bar chart per
metric.

Example:
    >>> from pathlib import Path
    >>> table, figures = artifact_paths(Path("out"), "test", ["accuracy", "count"])
    >>> table, figures
    ('out/by_group_test.csv', {'by_group_accuracy_test': 'out/by_group_accuracy_test.png'})
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

from lightning_trust.core.output import save_figure, write_json
from lightning_trust.fairness.frame import group_bar_figure, write_table_csv
from lightning_trust.fairness.groups import SUMMARIES

__all__ = ["artifact_paths", "group_values", "log_results", "write_artifacts", "write_figures"]


def log_results(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    prefix: str,
    results: dict[str, Any],
    metrics: Sequence[str],
    several_entries: bool,
    breaches: Optional[int],
    log_groups: bool = True,
) -> None:
    """Log the summaries (per entry too with ``several_entries``), the flagged count, the breach
    count (``None``: no limits declared) and, with ``log_groups``, every per-group number."""
    # summaries through pl_module.log (monitorable by EarlyStopping/ModelCheckpoint); the many
    # per-group numbers in one log_metrics call per logger (pl_module.log costs ~0.3 ms a key)
    values: dict[str, float] = {f"{prefix}/{s}": results[s] for s in SUMMARIES}
    if several_entries:
        for entry, part in results["by_feature"].items():
            values.update({f"{prefix}/{s}/{entry}": part[s] for s in SUMMARIES})
    values[f"{prefix}/flagged"] = float(len(results["flags"]))
    if breaches is not None:
        values[f"{prefix}/breaches"] = float(breaches)
    for key, value in values.items():
        pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=False)
    groups_log = group_values(prefix, results, metrics) if log_groups else {}
    if groups_log and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(groups_log, step=trainer.global_step)


def group_values(prefix: str, results: dict[str, Any], metrics: Sequence[str]) -> dict[str, float]:
    """Every per-group number by its log name (``<prefix>/<metric>/<groups>[/class=<c>]``)."""
    out: dict[str, float] = {}
    for groups_or_classes in results["by_group"].values():
        per_class = groups_or_classes if results["num_classes"] > 2 else {"": groups_or_classes}
        for cls, groups in per_class.items():
            suffix = f"/class={cls}" if cls else ""
            for cell in groups.values():
                for m in metrics:
                    out[f"{prefix}/{m}/{cell['log_name']}{suffix}"] = float(cell[m])
    return out


def artifact_paths(folder: Path, stage: str, metrics: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Where the files of ``stage`` go: the CSV table, and the bar charts by report name."""
    figures = {}
    for metric in metrics:
        if metric != "count":
            key = f"by_group_{metric}" if stage == "validation" else f"by_group_{metric}_test"
            figures[key] = str(folder / f"by_group_{metric}_{stage}.png")
    return str(folder / f"by_group_{stage}.csv"), figures


def write_artifacts(
    trainer: pl.Trainer, folder: Path, stage: str, results: dict[str, Any], metrics: Sequence[str]
) -> None:
    """Write the CSV table and the JSON results of ``stage``."""
    write_table_csv(folder / f"by_group_{stage}.csv", results, metrics)
    write_json(folder / f"fairness_{stage}.json", results)


def write_figures(
    trainer: pl.Trainer,
    folder: Path,
    stage: str,
    results: dict[str, Any],
    metrics: Sequence[str],
    min_group_size: int,
    prefix: str,
) -> None:
    """Draw a bar chart per metric (except ``count``) of ``stage`` and log it to the image loggers."""
    for metric in metrics:
        if metric != "count":
            fig_path = folder / f"by_group_{metric}_{stage}.png"
            figure = group_bar_figure(results, metric, stage, min_group_size)
            save_figure(trainer, figure, fig_path, tag=f"{prefix}/by_group_{metric}")
