"""Where a pass's result goes: its metrics to Lightning's loggers and ``callback_metrics``, its
tables (CSV/Markdown, the corruption errors JSON) to ``<log_dir>/lightning_trust/evaluation``, and
the latest pass into the report.

Example:
    >>> result = {"per_domain": {"Latin America": {"accuracy": 0.5, "ece": None}},
    ...           "worst": {"accuracy": 0.5}, "corruption_error": float("nan")}
    >>> logged_values(result)  # empty domains and NaN errors are not logged
    {'domain/Latin_America/accuracy': 0.5, 'domain/summary/worst/accuracy': 0.5}
    >>> from pathlib import Path
    >>> table_paths(Path("run"), "validate", result)
    {'csv': 'run/domains_validate.csv', 'markdown': 'run/domains_validate.md'}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_trust.core.output import write_json
from lightning_trust.core.tensors import to_jsonable
from lightning_trust.evaluation.domains import safe_name
from lightning_trust.evaluation.keys import LOGGED_SUMMARIES, REPORTED, VALIDATION_KEYS
from lightning_trust.evaluation.summary import write_tables

__all__ = ["log_result", "log_to_loggers", "logged_values", "report_of", "table_paths", "write_artifacts"]


def logged_values(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a pass's ``result`` under their logged names (see
    :data:`~lightning_trust.evaluation.keys.LOGGED_KEYS`), without missing values."""
    values: dict[str, float] = {}
    for name, metrics in result["per_domain"].items():
        for metric, value in metrics.items():
            if value is not None:
                values[f"domain/{safe_name(name)}/{metric}"] = value
    for key in LOGGED_SUMMARIES:
        for metric, value in result.get(key, {}).items():
            if value is not None:
                values[f"domain/summary/{key}/{metric}"] = value
    for key in ("corruption_error", "relative_corruption_error"):
        if key in result and not math.isnan(result[key]):
            values[f"domain/summary/{key}"] = result[key]
    return values


def log_result(trainer: pl.Trainer, result: Mapping[str, Any]) -> None:
    """Log a pass's metrics to the loggers (rank zero) and to ``callback_metrics`` (every process)."""
    values = logged_values(result)
    if not values:
        return
    # Every process holds the same synced numbers, so they go straight to the loggers (rank zero)
    # and to `callback_metrics` on every process (for ModelCheckpoint/EarlyStopping monitors, which
    # must agree across processes): `self.log` would build a reducing result object per key, costing
    # more than the whole evaluation.
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
    log_to_loggers(trainer, values)


@rank_zero_only
def log_to_loggers(trainer: pl.Trainer, values: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)


def table_paths(folder: Path, stage: str, result: Mapping[str, Any]) -> dict[str, str]:
    """The paths :func:`write_artifacts` writes for a pass of ``stage`` (the report's ``tables``)."""
    paths = {"csv": str(folder / f"domains_{stage}.csv"), "markdown": str(folder / f"domains_{stage}.md")}
    if "corruption" in result:
        paths["corruption_errors"] = str(folder / f"corruption_errors_{stage}.json")
    return paths


@rank_zero_only
def write_artifacts(
    folder: Path, stage: str, result: Mapping[str, Any], metric_names: Sequence[str], in_names: Sequence[str]
) -> None:
    """Write the pass's tables (and, with corruptions, its corruption errors) on rank zero."""
    write_tables(folder / f"domains_{stage}", result["per_domain"], result["sizes"], metric_names, in_names, result)
    if "corruption" in result:
        write_json(folder / f"corruption_errors_{stage}.json", result["corruption"])


def report_of(
    results: Mapping[str, Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    figures: Mapping[str, str],
    metric_names: Sequence[str],
    domain_key: Any,
) -> dict[str, Any]:
    """The report of the latest pass in ``results`` (``{stage: result}``; test when run, else the
    last validation) as plain JSON (see :data:`~lightning_trust.evaluation.keys.REPORT_KEYS`)."""
    test, validate = RunningStage.TESTING.value, RunningStage.VALIDATING.value
    stage = test if test in results else validate
    if stage not in results:
        return {"evaluated": False, "metrics": list(metric_names), "figures": dict(figures)}
    result = results[stage]
    out: dict[str, Any] = {"evaluated": True, "domain_key": domain_key}
    out.update({k: result[k] for k in REPORTED if k in result})
    if stage == test and validate in results:
        val = results[validate]
        out["validation"] = {k: val[k] for k in VALIDATION_KEYS if k in val}
    out["history"] = list(history)
    out["figures"] = dict(figures)
    return dict(to_jsonable(out, strict=True))
