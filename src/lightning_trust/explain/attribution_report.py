"""The report of :class:`~lightning_trust.explain.Attribution`: its last pass as plain JSON (see
:data:`~lightning_trust.explain.keys.ATTRIBUTION_REPORT_KEYS`).

A final pass cut to the budget explains a prefix of the fixed sample: ``samples_explained`` of
``num_samples``, and every number in :data:`AGGREGATES` is over those samples (``aggregated_over``).

Example:
    >>> from lightning_trust.explain import Attribution
    >>> report = attribution_report(Attribution(num_samples=16))
    >>> report["num_samples"], report["samples_explained"], report["aggregated_over"]
    (16, None, None)
"""

from __future__ import annotations

from typing import Any

from lightning_trust.core.tensors import to_jsonable
from lightning_trust.explain.methods import BASELINES

__all__ = ["AGGREGATES", "attribution_report"]

#: The report's numbers aggregated over the samples a pass explained (a prefix when cut to the budget).
AGGREGATES = ("top_features", "convergence_delta", "infidelity", "sensitivity_max", "drift", "tokens")


def attribution_report(cb: Any) -> dict[str, Any]:
    """``cb``'s last pass (its record after a resume), its budget, figures and files."""
    last, plan = cb.last, cb._plan
    total = len(cb.sample.inputs) if cb.sample is not None else cb.num_samples
    explained = last.samples_explained if last is not None else None
    if last is None and cb.history:  # resumed: the last pass's record
        explained = cb.history[-1].get("samples")
    return to_jsonable({
        "method": cb.method,
        "target": cb.target,
        "baseline": cb.baseline if not isinstance(cb.baseline, str) or cb.baseline in BASELINES else "file",
        "num_samples": total,
        "samples_explained": explained,
        "aggregated_over": None if explained is None else {"samples": explained, "of": total, "numbers": AGGREGATES},
        "epoch": None if last is None else last.epoch,
        "top_features": [] if last is None else last.top(cb.top_k),
        "infidelity": None if last is None else last.infidelity,
        "sensitivity_max": None if last is None else last.sensitivity_max,
        "convergence_delta": None if last is None else last.convergence_delta,
        "drift": None if last is None else last.drift,
        "drift_history": [h["drift"] for h in cb.history],
        "seconds": cb.total_seconds,
        "input": plan.key if plan is not None and isinstance(plan.key, str) else None,
        "layer": None if plan is None else plan.layer,
        "tokens": None if last is None else last.token_scores(),
        "generated": None if last is None else last.generated,
        "patch_size": None if plan is None else plan.patch_size,
        "budget": cb.account.summary(plan, cb._owed.seconds),
        "figures": dict(cb._figures),
        "files": {} if last is None else dict(last.files),
    })  # fmt: skip
