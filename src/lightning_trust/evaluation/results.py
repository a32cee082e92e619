"""Per-domain metrics: buffered on the device, flushed into one torchmetrics object per domain and
metric, computed (synced across processes) at the end of a pass, and the corruption summary.

Example:
    >>> import torch
    >>> from lightning_trust.evaluation.metrics import MetricSpec
    >>> metrics = DomainMetrics(["a", "b"], [MetricSpec.from_name("accuracy")], buffer_size=100)
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> metrics.add(probs, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
    >>> metrics.flush()
    >>> metrics.counts, float(metrics.metrics[1]["accuracy"].compute())
    ([2, 1], 0.0)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError

from lightning_trust.core.output import warn_once
from lightning_trust.evaluation.corruptions import corruption_errors
from lightning_trust.evaluation.metrics import MetricSpec, higher_is_better
from lightning_trust.evaluation.summary import summarize

__all__ = [
    "DomainMetrics",
    "DomainValues",
    "corruption_summary",
    "load_baseline",
    "pass_result",
    "reliability_bins",
    "restrict_values",
    "warn_gaps",
]


@dataclass
class DomainValues:
    """What :meth:`DomainMetrics.compute` returns: each domain's metric values (``None`` for an empty
    domain), its sample count, the samples of values not evaluated, the reliability bins of each
    domain with a calibration metric, and each metric's direction (higher is better)."""

    per_domain: dict[str, dict[str, Optional[float]]]
    sizes: dict[str, int]
    unlisted: int
    reliability: dict[str, dict[str, list[float]]]
    directions: dict[str, bool]


class DomainMetrics:
    """One torchmetrics object per domain and metric, fed from a device buffer.

    Predictions wait in the buffer until ``buffer_size`` samples are there; then each domain's
    metrics are updated once (one host sync for the counts). The metrics are built on the first
    flush, for ``num_classes`` classes or the predictions' width, and kept (reset) across passes.
    """

    def __init__(
        self, names: Sequence[str], specs: Sequence[MetricSpec], buffer_size: int, num_classes: Optional[int] = None
    ) -> None:
        self.names = list(names)
        self.specs = list(specs)
        self.buffer_size = buffer_size
        self.num_classes = num_classes
        self.metrics: Optional[list[dict[str, Metric]]] = None
        self.counts: list[int] = [0] * len(self.names)
        self.unlisted = 0
        self._buffer: list[tuple[Tensor, Tensor, Tensor]] = []
        self._buffered = 0

    def reset(self) -> None:
        """Start a new pass: empty the buffer and the counts, reset every metric."""
        self._buffer, self._buffered = [], 0
        self.counts = [0] * len(self.names)
        self.unlisted = 0
        for metrics in self.metrics or []:
            for metric in metrics.values():
                metric.reset()

    def add(self, probs: Tensor, target: Tensor, index: Tensor) -> None:
        """Buffer class probabilities ``(N, C)``, targets and domain indices (``len(names)``: not evaluated)."""
        self._buffer.append((probs, target, index))
        self._buffered += len(target)
        if self._buffered >= self.buffer_size:
            self.flush()

    def build(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.metrics = [{s.name: s.build(num_classes).to(device) for s in self.specs} for _ in self.names]

    def flush(self) -> None:
        """One update per domain and metric with everything buffered (one host sync for the counts)."""
        if not self._buffer:
            return
        probs = torch.cat([b[0] for b in self._buffer])
        target = torch.cat([b[1] for b in self._buffer]).long()
        index = torch.cat([b[2] for b in self._buffer])
        self._buffer, self._buffered = [], 0
        if self.metrics is None:
            self.build(self.num_classes or int(probs.shape[1]), probs.device)
        assert self.metrics is not None
        if probs.shape[1] != self.num_classes:
            raise ValueError(
                f"Predictions have {probs.shape[1]} columns but the metrics were built for {self.num_classes} classes; "
                "set `num_classes` to match the model's outputs."
            )
        k = len(self.names)
        counts = torch.bincount(index, minlength=k + 1).tolist()
        order = torch.argsort(index, stable=True)
        probs_sorted, target_sorted = probs[order], target[order]
        start = 0
        for d, n in enumerate(counts[:k]):
            if n:
                p, t = probs_sorted[start : start + n], target_sorted[start : start + n]
                for metric in self.metrics[d].values():
                    metric.update(p[:, 1] if MetricSpec.takes_positive_probability(metric) else p, t)
                self.counts[d] += n
            start += n
        self.unlisted += counts[k] if len(counts) > k else 0

    def compute(self, strategy: Any, world_size: int, device: torch.device) -> DomainValues:
        """Flush, agree across processes (class count, sample counts) and compute every metric."""
        self.flush()
        if self.metrics is None:  # this process saw no data: agree on the class count with the others
            local = torch.tensor(self.num_classes or 0, device=device)
            classes = int(strategy.reduce(local, reduce_op="max")) if world_size > 1 else int(local)
            if classes < 2:
                raise RuntimeError("CrossDomainEvaluation saw no predictions in any domain; is the dataloader empty?")
            self.build(classes, device)
        elif world_size > 1:
            strategy.reduce(torch.tensor(self.num_classes or 0, device=device), reduce_op="max")  # matched collective
        assert self.metrics is not None
        totals = torch.tensor([*self.counts, self.unlisted], dtype=torch.long, device=device)
        if world_size > 1:
            totals = strategy.reduce(totals, reduce_op="sum")
        totals_list = [int(v) for v in totals.tolist()]
        sizes = dict(zip(self.names, totals_list[:-1]))
        per_domain: dict[str, dict[str, Optional[float]]] = {}
        reliability: dict[str, dict[str, list[float]]] = {}
        directions: dict[str, bool] = {}
        for d, name in enumerate(self.names):
            per_domain[name] = {}
            for metric_name, metric in self.metrics[d].items():
                directions[metric_name] = higher_is_better(metric)
                if sizes[name] == 0:
                    per_domain[name][metric_name] = None
                    continue
                value = metric.compute()  # syncs the states across processes
                per_domain[name][metric_name] = (
                    float(value) if isinstance(value, Tensor) and value.numel() == 1 else None
                )
                if isinstance(metric, MulticlassCalibrationError):
                    reliability[name] = reliability_bins(metric)
                metric.reset()
        return DomainValues(
            per_domain=per_domain, sizes=sizes, unlisted=totals_list[-1], reliability=reliability, directions=directions
        )


def restrict_values(values: DomainValues, names: Sequence[str]) -> DomainValues:
    """``values`` of the domains ``names`` only (a pass whose extra domains were skipped)."""
    keep = set(names)
    return DomainValues(
        per_domain={n: v for n, v in values.per_domain.items() if n in keep},
        sizes={n: v for n, v in values.sizes.items() if n in keep},
        unlisted=values.unlisted,
        reliability={n: v for n, v in values.reliability.items() if n in keep},
        directions=values.directions,
    )


def reliability_bins(metric: Metric) -> dict[str, list[float]]:
    """Accuracy, confidence and share per confidence bin of a calibration-error metric (synced states)."""
    from torchmetrics.utilities.data import dim_zero_cat

    n_bins = int(getattr(metric, "n_bins", 15))
    with metric.sync_context(should_sync=True, should_unsync=True):
        confidences = dim_zero_cat(metric.confidences).float()  # type: ignore[arg-type]
        accuracies = dim_zero_cat(metric.accuracies).float()  # type: ignore[arg-type]
    index = (confidences * n_bins).long().clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, device=confidences.device).scatter_add_(0, index, torch.ones_like(confidences))
    conf = torch.zeros(n_bins, device=confidences.device).scatter_add_(0, index, confidences)
    acc = torch.zeros(n_bins, device=confidences.device).scatter_add_(0, index, accuracies)
    safe = count.clamp_min(1)
    return {
        "accuracy": (acc / safe).tolist(),
        "confidence": (conf / safe).tolist(),
        "proportion": (count / count.sum().clamp_min(1)).tolist(),
        "count": count.long().tolist(),
    }


def pass_result(
    values: DomainValues,
    stage: str,
    epoch: int,
    step: int,
    metric_names: Sequence[str],
    names: Sequence[str],
    in_names: Sequence[str],
) -> dict[str, Any]:
    """One pass's result from its computed ``values``: the domains and their sizes, the per-domain
    metrics, the summaries over the domains (:func:`~lightning_trust.evaluation.summary.summarize`)
    and the reliability bins."""
    return {
        "stage": stage,
        "epoch": epoch,
        "step": step,
        "metrics": list(metric_names),
        "domains": list(names),
        "in_domain_domains": [n for n in names if n in in_names],
        "ood_domains": [n for n in names if n not in in_names],
        "sizes": values.sizes,
        "empty_domains": [n for n in names if values.sizes[n] == 0],
        "unlisted_samples": values.unlisted,
        "per_domain": values.per_domain,
        **summarize(values.per_domain, values.sizes, values.directions, in_names),
        "reliability": values.reliability,
    }


def warn_gaps(
    owner: object, values: DomainValues, names: Sequence[str], stage: str, domain_key: Optional[str],
    side_names: Sequence[str],
) -> None:  # fmt: skip
    """Warn ``owner``'s run once of domains without samples and of samples of domains not evaluated."""
    empty = [n for n in names if values.sizes[n] == 0]
    if empty:
        warn_once(owner, f"empty {empty}", (
            f"CrossDomainEvaluation: domain(s) {empty} had no samples in this {stage} pass; their metrics "
            "are left out of the summaries (reported as null, listed under `empty_domains`)."
        ))  # fmt: skip
    if values.unlisted:
        warn_once(owner, "unlisted", (
            f"CrossDomainEvaluation: {values.unlisted} samples had a {domain_key!r} value outside the "
            f"evaluated domains {list(side_names)}; add the value to `domain_values` to evaluate it (the count "
            "of each pass is reported as `unlisted_samples`)."
        ))  # fmt: skip


def corruption_summary(
    per_domain: Mapping[str, Mapping[str, Optional[float]]],
    sizes: Mapping[str, int],
    clean: Sequence[str],
    corruptions: Sequence[str],
    severities: Sequence[int],
    baseline: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """``corruption_error``, ``relative_corruption_error`` and the full ``corruption`` table from the
    accuracy of the ``clean`` domains (size-weighted) and of each ``<corruption>_s<severity>``."""
    accs = [(float(acc), sizes[n]) for n in clean if (acc := per_domain[n].get("accuracy")) is not None]
    total = sum(w for _, w in accs)
    clean_error = 1.0 - sum(a * w for a, w in accs) / total if total else float("nan")
    errors: dict[str, dict[int, float]] = {}
    for c in corruptions:
        errors[c] = {}
        for s in severities:
            acc = per_domain[f"{c}_s{s}"].get("accuracy")
            if acc is not None:
                errors[c][s] = 1.0 - acc
    errors = {c: v for c, v in errors.items() if v}
    ce = corruption_errors(clean_error, errors, baseline)
    return {
        "corruption_error": ce["corruption_error"],
        "relative_corruption_error": ce["relative_corruption_error"],
        "corruption": ce,
    }


def load_baseline(path: str) -> dict[str, Any]:
    """A baseline model's corruption errors: a ``corruption_errors_<stage>.json`` this callback wrote
    (or a saved report section holding one under ``"corruption"``)."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(
            f"`baseline_errors` file {path!r} does not exist; point it at a baseline run's "
            "lightning_trust/evaluation/corruption_errors_<stage>.json."
        )
    data = json.loads(file.read_text())
    if isinstance(data, Mapping) and "corruption" in data and "errors" not in data:
        data = data["corruption"]  # a saved report section
    if not isinstance(data, Mapping) or "errors" not in data or "clean_error" not in data:
        raise ValueError(
            f"`baseline_errors` {path!r} must hold {{'clean_error': float, 'errors': {{corruption: {{severity: error}}}}}} "
            "(the corruption_errors_<stage>.json this callback writes)."
        )
    return dict(data)
