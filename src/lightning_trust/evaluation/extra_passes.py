"""The evaluation's extra forward passes, each in an isolated pass
(:func:`~lightning_trust.core.passes.isolated_eval`): a batch under every corruption and severity
(the domains ``<corruption>_s<severity>``), and the extra domains' own loaders. The clean domains
cost none: they reuse the step's own forward.

Example:
    >>> corruption_seed(0, rank=0, batch_idx=0, corruption_index=1, severity=3)  # one generator each
    20
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_trust.core.batch import BatchContract, call_module, logits_of
from lightning_trust.core.passes import isolated_eval
from lightning_trust.evaluation.corruptions import corrupt
from lightning_trust.evaluation.domains import extra_domain_loader
from lightning_trust.evaluation.metrics import to_probabilities
from lightning_trust.evaluation.results import DomainMetrics

__all__ = ["corruption_seed", "evaluate_corruptions", "evaluate_extra_domains"]


def corruption_seed(seed: int, rank: int, batch_idx: int, corruption_index: int, severity: int) -> int:
    """The seed of the noise of one corruption and severity on one batch of one process."""
    return (seed * 1_000_003 + rank * 100_003 + batch_idx * 1009 + corruption_index * 17 + severity) % (2**63)


def evaluate_corruptions(
    metrics: DomainMetrics,
    pl_module: pl.LightningModule,
    trainer: pl.Trainer,
    inputs: Any,
    target: Tensor,
    batch_idx: int,
    *,
    corruptions: Sequence[str],
    severities: Sequence[int],
    first: int,
    seed: int,
    value_range: tuple[float, float],
    prediction_type: str,
) -> None:
    """Add the batch under each corruption and severity to ``metrics``, as the domains from index
    ``first`` on (corruption-major, then severity)."""
    with isolated_eval(pl_module, trainer) as module:
        for ci, name in enumerate(corruptions):
            for si, severity in enumerate(severities):
                generator = torch.Generator(device=inputs.device if isinstance(inputs, Tensor) else "cpu")
                generator.manual_seed(corruption_seed(seed, trainer.global_rank, batch_idx, ci, severity))
                x = corrupt(inputs, name, severity, generator, value_range)
                probs = to_probabilities(logits_of(call_module(module, x)), prediction_type)
                d = first + ci * len(severities) + si
                metrics.add(probs, target, torch.full_like(target, d, dtype=torch.long))


def evaluate_extra_domains(
    metrics: DomainMetrics,
    pl_module: pl.LightningModule,
    trainer: pl.Trainer,
    domains: Mapping[str, Any],
    loaders: dict[str, Any],
    names: Sequence[str],
    contract: BatchContract,
    *,
    batch_size: Optional[int],
    prediction_type: str,
) -> None:
    """Add every extra domain's data to ``metrics`` under its name's index in ``names``; each loader
    is built on first use and kept in ``loaders``."""
    for name, source in domains.items():
        if name not in loaders:
            loaders[name] = extra_domain_loader(name, source, trainer, pl_module, batch_size)
        d = list(names).index(str(name))
        with isolated_eval(pl_module, trainer) as module:
            for batch in loaders[name]:
                batch = trainer.strategy.batch_to_device(batch)
                probs = to_probabilities(contract.predictions(module, batch), prediction_type)
                target = torch.as_tensor(contract.target(batch), device=probs.device).reshape(-1).long()
                metrics.add(probs, target, torch.full_like(target, d))
