"""What :class:`~lightning_trust.compression.ProgressivePruning` measures and reports: the model's
size and accuracy before the first step and at the end, one record per pruning step (logged), the
pruning curve figure, the report and its files.

Example:
    >>> before = {"params": 100, "macs": 1000, "epoch": 0}
    >>> steps = [{"epoch": 1, "step": 5, "target": 0.5, "channel_ratio": 0.5, "params": 30, "macs": 250,
    ...           "param_ratio": 0.3, "macs_ratio": 0.25}]
    >>> report = pruning_report(before, {}, steps, importance="group_magnitude", schedule="one_shot",
    ...                         global_pruning=False, channel_ratio=0.5, steps_done=1)
    >>> report["params_after"], report["macs_ratio"]
    (30, 0.25)
    >>> pruning_figure(steps, "one_shot", "group_magnitude").axes[0].get_title()
    'ProgressivePruning (one_shot, group_magnitude)'
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_trust.compression.examples import on_device, repeat_rows
from lightning_trust.compression.measure import collect_predictions, cpu_copy, measure_latency, reduced_mean
from lightning_trust.core import artifact_dir, isolated_eval, new_figure, save_figure, write_json
from lightning_trust.core.batch import BatchContract
from lightning_trust.core.loaders import split_loaders
from lightning_trust.core.macs import count_macs_params

__all__ = [
    "log_step",
    "measure_dense",
    "measure_model",
    "measure_pruned",
    "pruning_figure",
    "pruning_report",
    "record_step",
    "save_artifacts",
    "step_record",
    "validation_accuracy",
]


def validation_accuracy(trainer: Any, module: nn.Module, contract: Optional[BatchContract]) -> Optional[float]:
    """Accuracy of ``module`` over the validation loaders (all ranks), or ``None`` without them."""
    loaders = split_loaders(trainer, "val")
    if not loaders or contract is None:
        return None
    device = next(iter(module.parameters()), torch.empty(0)).device
    with isolated_eval(module, trainer):
        preds, target = collect_predictions({"m": module}, loaders, contract, device)
    if target.numel() == 0:
        return None
    return reduced_mean(trainer, (preds["m"] == target).float())


def measure_model(
    trainer: Any, module: nn.Module, example: Any, contract: Optional[BatchContract], evaluate: bool
) -> dict[str, Any]:
    """Parameters and MACs of one sample of ``module``; with ``evaluate`` its validation accuracy too."""
    macs, params = count_macs_params(module, example)
    out: dict[str, Any] = {"params": params, "macs": macs}
    if evaluate:
        out["accuracy"] = validation_accuracy(trainer, module, contract)
    return out


def measure_dense(
    trainer: Any, module: nn.Module, example: Any, contract: Optional[BatchContract], evaluate: bool,
    latency_rows: Optional[int],
) -> tuple[dict[str, Any], nn.Module]:  # fmt: skip
    """Before the first step: :func:`measure_model`, the epoch and, with ``latency_rows``, the CPU latency
    of a batch of that many rows of ``example``; returns them and a CPU copy of the dense model."""
    before = measure_model(trainer, module, on_device(example, module), contract, evaluate)
    before["epoch"] = trainer.current_epoch
    skeleton = cpu_copy(module)
    if latency_rows is not None:
        before["latency_s"] = measure_latency(skeleton, repeat_rows(example, latency_rows))
    return before, skeleton


def measure_pruned(
    trainer: Any, module: nn.Module, example: Any, contract: Optional[BatchContract], evaluate: bool,
    latency_rows: Optional[int], skeleton: Optional[nn.Module], before: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """At the end: :func:`measure_model` and, with ``latency_rows``, the CPU latency; the dense
    ``skeleton``'s latency in ``before`` is measured again now, back to back, for a fair ratio."""
    after = measure_model(trainer, module, on_device(example, module), contract, evaluate)
    if latency_rows is not None:
        batch = repeat_rows(example, latency_rows)
        after["latency_s"] = measure_latency(cpu_copy(module), batch)
        if skeleton is not None:
            before["latency_s"] = measure_latency(skeleton, batch)
    return after


def record_step(
    trainer: Any, before: Mapping[str, Any], module: nn.Module, example: Any, target: float, channel_ratio: float,
    epoch: int, number: int,
) -> dict[str, Any]:  # fmt: skip
    """:func:`step_record` of pruning step ``number`` (1-based), logged by :func:`log_step`."""
    step = step_record(trainer, before, module, example, target, channel_ratio, epoch)
    log_step(trainer, step, number)
    return step


def step_record(
    trainer: Any, before: Mapping[str, Any], module: nn.Module, example: Any, target: float, channel_ratio: float,
    epoch: int,
) -> dict[str, Any]:  # fmt: skip
    """One pruning step: epoch, step, target, channel ratio, params, MACs and their ratios to dense."""
    macs, params = count_macs_params(module, example)
    return {
        "epoch": epoch,
        "step": trainer.global_step,
        "target": float(target),
        "channel_ratio": float(channel_ratio),
        "params": params,
        "macs": macs,
        "param_ratio": params / before["params"],
        "macs_ratio": macs / before["macs"],
    }


def log_step(trainer: Any, step: Mapping[str, Any], number: int) -> None:
    """Log pruning step ``number`` (1-based) straight to the loggers, and say it on rank zero."""
    params, macs = step["params"], step["macs"]
    metrics = {"compression/params": float(params), "compression/macs": float(macs),
               "compression/channel_ratio": step["channel_ratio"], "compression/macs_ratio": step["macs_ratio"]}  # fmt: skip
    if trainer.is_global_zero:  # once per pruning step, straight to the loggers (not every n steps)
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(metrics, step=trainer.global_step)
    rank_zero_info(
        f"ProgressivePruning step {number} (epoch {step['epoch']}): channel ratio {step['channel_ratio']:.3f}, "
        f"params {params:,} ({step['param_ratio']:.1%}), MACs {macs:,.0f} ({step['macs_ratio']:.1%})"
    )


def pruning_figure(steps: list[dict[str, Any]], schedule: str, importance: str, first_epoch: int = 0) -> Any:
    """The share of the dense model's params and MACs (and of channels removed) over the epochs,
    from ``first_epoch`` (the epoch the dense model was measured)."""
    fig = new_figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    epochs = [first_epoch] + [s["epoch"] for s in steps]
    ax.step(epochs, [1.0] + [s["param_ratio"] for s in steps], where="post", marker="o", label="params")
    ax.step(epochs, [1.0] + [s["macs_ratio"] for s in steps], where="post", marker="s", label="MACs")
    ax.step(epochs, [0.0] + [s["channel_ratio"] for s in steps], where="post", ls="--", label="channels removed")
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of dense model")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"ProgressivePruning ({schedule}, {importance})")
    ax.legend()
    return fig


def pruning_report(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    steps: list[dict[str, Any]],
    importance: str,
    schedule: str,
    global_pruning: bool,
    channel_ratio: float,
    steps_done: int,
    figures: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """The report (see :data:`~lightning_trust.compression.keys.PRUNING_REPORT_KEYS`); before the end
    of fit the latest step stands for ``after``."""
    after = after or ({"params": steps[-1]["params"], "macs": steps[-1]["macs"]} if steps else {})
    out: dict[str, Any] = {
        "method": "torch-pruning structural",
        "importance": importance,
        "schedule": schedule,
        "global_pruning": global_pruning,
        "channel_ratio": channel_ratio,
        "steps_done": steps_done,
        "params_before": before.get("params"),
        "params_after": after.get("params"),
        "macs_before": before.get("macs"),
        "macs_after": after.get("macs"),
    }
    if before.get("params") and after.get("params"):
        out["param_ratio"] = after["params"] / before["params"]
        out["macs_ratio"] = after["macs"] / before["macs"]
    if before.get("latency_s") and after.get("latency_s"):
        out["latency_before_ms"] = before["latency_s"] * 1e3
        out["latency_after_ms"] = after["latency_s"] * 1e3
        out["speedup"] = before["latency_s"] / after["latency_s"]
    if "accuracy" in before:
        out["accuracy_before"] = before["accuracy"]
    if "accuracy" in after:
        out["accuracy_after"] = after["accuracy"]
    for key, label in (
        ("heads_per_layer", "heads"),
        ("hidden_per_layer", "hidden"),
        ("mlp_width_per_layer", "mlp_width"),
    ):
        # None for a model without attention modules exposing their heads (nothing was measured)
        out[f"{label}_before"] = list(before["shapes"][key]) if key in before.get("shapes", {}) else None
        out[f"{label}_after"] = list(after["shapes"][key]) if key in after.get("shapes", {}) else None
    out["steps"] = copy.deepcopy(steps)
    if figures:
        out["figures"] = dict(figures)
    return out


def save_artifacts(trainer: Any, report: Mapping[str, Any], first_epoch: int = 0) -> dict[str, str]:
    """Write ``pruning.json`` and the pruning curve of the ``report`` (rank zero); returns the figures
    by name. ``first_epoch``: the epoch the dense model was measured."""
    folder = artifact_dir(trainer, "compression")  # on every rank: log_dir is a collective under DDP
    if not trainer.is_global_zero:
        return {}
    write_json(folder / "pruning.json", report)
    figures = {"pruning_curve": str(folder / "pruning_curve.png")}
    figure = pruning_figure(report["steps"], report["schedule"], report["importance"], first_epoch)
    save_figure(trainer, figure, folder / "pruning_curve.png", tag="compression/pruning_curve")
    return figures
