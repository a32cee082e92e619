"""What a budgeted pass of :class:`~lightning_trust.evaluation.CrossDomainEvaluation` evaluated in its
extra passes: samples of each source (summed over processes), of how many, whether the budget cut
it, and the hidden domain that holds the clean copy of a cut corruption suite's samples (its
corruption errors compare the same samples, never a subset with the whole).

Example:
    >>> class One:  # a single-process Trainer
    ...     world_size = 1
    >>> done = {"corruptions": {"samples": 64, "batches": 1, "truncated": True}, "domains": {}}
    >>> out = extra_samples(done, rows=270, trainer=One())
    >>> out["samples"], out["corruptions"]["samples_available"], out["truncated"]
    (64, 270, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["SUBSET", "extra_samples"]

#: The hidden domain of a cut corruption suite's samples, clean (never reported as a domain).
SUBSET = "<clean samples of the corruption suite>"


def extra_samples(done: Mapping[str, Any], rows: int, trainer: Any) -> dict[str, Any]:
    """The report's ``extra_samples`` of one pass from :func:`~lightning_trust.evaluation.extra_passes.run_extra_passes`'s
    account ``done`` and the ``rows`` of dataloader 0 this process evaluated (what the corruptions may
    cut): each source's samples and samples available (each process's share of a sharded loader),
    summed over processes, and ``truncated``."""
    corruptions = done.get("corruptions")
    domains = dict(done.get("domains", {}))
    available = [-1 if d["samples_available"] is None else d["samples_available"] for d in domains.values()]
    counts = [rows, corruptions["samples"] if corruptions else 0, *[d["samples"] for d in domains.values()], *available]
    if getattr(trainer, "world_size", 1) > 1:  # every process reaches this with the same sources
        device = getattr(getattr(trainer, "strategy", None), "root_device", torch.device("cpu"))
        counts = [int(v) for v in trainer.strategy.reduce(torch.tensor(counts, device=device), reduce_op="sum")]
    out: dict[str, Any] = {"corruptions": None, "domains": {}}
    if corruptions:
        out["corruptions"] = {"samples": counts[1], "samples_available": counts[0],
                              "truncated": bool(corruptions["truncated"])}  # fmt: skip
    k = len(domains)
    for (name, d), n, total in zip(domains.items(), counts[2 : 2 + k], counts[2 + k :]):
        out["domains"][name] = {"samples": n, "samples_available": total if total >= 0 else None,
                                "truncated": bool(d["truncated"])}  # fmt: skip
    sources = [out["corruptions"], *out["domains"].values()]
    out["samples"] = sum(s["samples"] for s in sources if s)
    out["truncated"] = any(s["truncated"] for s in sources if s)
    return out
