"""The evaluation's extra forward passes, each in an isolated pass
(:func:`~lightning_trust.core.passes.isolated_eval`): a batch under every corruption and severity
(the domains ``<corruption>_s<severity>``: image corruptions or text perturbations), and the extra
domains' own loaders. The clean domains cost none: they reuse the step's own forward. The corrupted
copies are made at the end of the pass from the batches the stage evaluated (the loader read again),
so that one budgeted, timed block holds every extra pass.

Within the budget (:class:`~lightning_trust.core.sizing.PassSizer`) each source (the corrupted
copies, then each extra domain) times its first batch and evaluates only the batches its share of
the spare budget affords (a final pass at least one batch and 64 samples), the same batches under
every corruption and severity; under DDP rank zero decides and broadcasts the count, so every
process evaluates as many batches. A budgeted corruption suite also evaluates its batches clean (the
``subset`` domain, one forward per batch next to one per corruption and severity), so that the
corruption errors of a cut suite compare the same samples.

Example:
    >>> corruption_seed(0, rank=0, batch_idx=0, corruption_index=1, severity=3)  # one generator each
    20
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_trust.core.batch import BatchContract, call_module, logits_of
from lightning_trust.core.budget import OverheadBudget
from lightning_trust.core.loaders import first_loader
from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.sizing import MIN_SAMPLES, PassSizer
from lightning_trust.core.tensors import first_tensor
from lightning_trust.evaluation.corruptions import corrupt_inputs
from lightning_trust.evaluation.domains import extra_domain_loader
from lightning_trust.evaluation.metrics import to_probabilities
from lightning_trust.evaluation.results import DomainMetrics
from lightning_trust.evaluation.text import TEXT_CORRUPTIONS, Vocabulary, perturb_tokens
from lightning_trust.evaluation.tokens import align_tokens, is_token_level

__all__ = [
    "BatchLimit", "add_predictions", "corruption_seed", "evaluate_corruptions", "evaluate_extra_domains",
    "run_extra_passes",
]  # fmt: skip

_UNBOUNDED = 2**62  # the batch count of a loader without a length


def corruption_seed(seed: int, rank: int, batch_idx: int, corruption_index: int, severity: int) -> int:
    """The seed of the noise of one corruption and severity on one batch of one process."""
    return (seed * 1_000_003 + rank * 100_003 + batch_idx * 1009 + corruption_index * 17 + severity) % (2**63)


def add_predictions(
    metrics: DomainMetrics, preds: Tensor, target: Any, index: Tensor, shift: Optional[int], prediction_type: str
) -> None:
    """Score one batch: class predictions per sample, or per labelled token for token-level targets
    (each token in its sample's domain, see :mod:`~lightning_trust.evaluation.tokens`)."""
    target = torch.as_tensor(target, device=preds.device)
    if is_token_level(preds, target):
        preds, target, index = align_tokens(preds, target, index, shift or 0)
    metrics.add(to_probabilities(preds, prediction_type), target.reshape(-1), index)


def _corrupted(
    inputs: Any, target: Any, name: str, severity: int, generator: torch.Generator, value_range: tuple[float, float],
    vocabulary: Optional[Vocabulary],
) -> tuple[Any, Any]:  # fmt: skip
    if name in TEXT_CORRUPTIONS:
        assert vocabulary is not None  # setup found one (check_setup)
        return perturb_tokens(inputs, name, severity, generator, vocabulary, target)
    return corrupt_inputs(inputs, name, severity, generator, value_range), target


class BatchLimit:
    """How many of a source's ``total`` batches a pass evaluates: all, until :meth:`decide` (after the
    first batch, timed by ``sizer``) sets as many as its ``share`` of the spare budget affords (a
    final pass at least one batch and :data:`~lightning_trust.core.sizing.MIN_SAMPLES` samples), the
    count broadcast from rank zero so that every process evaluates as many batches."""

    def __init__(self, trainer: Any, sizer: PassSizer, total: float, share: float = 1.0) -> None:
        self.trainer, self.sizer, self.share = trainer, sizer, share
        self.total = int(total) if math.isfinite(total) else _UNBOUNDED
        self.limit = self.total
        self.since = sizer.budget.clock()

    def decide(self, rows: int) -> None:
        """Set the limit after the first batch of ``rows`` samples."""
        if self.sizer.enabled:
            minimum = max(1, math.ceil(MIN_SAMPLES / max(rows, 1)))
            self.sizer.reserve_units = minimum  # a pass that is not final keeps the final's minimum
            wanted = self.sizer.count(1, self.total, minimum=minimum, share=self.share, since=self.since)
            self.limit = int(self.trainer.strategy.broadcast(wanted, src=0))

    @property
    def cut(self) -> bool:
        """Whether the budget stops the source before its last batch."""
        return self.limit < self.total


def evaluate_corruptions(
    metrics: DomainMetrics,
    pl_module: pl.LightningModule,
    trainer: pl.Trainer,
    loader: Iterable[Any],
    max_batches: float,
    contract: BatchContract,
    *,
    corruptions: Sequence[str],
    severities: Sequence[int],
    first: int,
    seed: int,
    value_range: tuple[float, float],
    prediction_type: str,
    vocabulary: Optional[Vocabulary] = None,
    shift: Optional[int] = None,
    sizer: Optional[PassSizer] = None,
    share: float = 1.0,
    subset: Optional[int] = None,
) -> dict[str, Any]:
    """Add the first ``max_batches`` batches of ``loader`` (the ones the stage evaluated), as many as
    ``sizer`` affords, under each corruption and severity to ``metrics``, as the domains from index
    ``first`` on (corruption-major, then severity); each batch, corruption and severity has its own
    seeded generator. When the budget may cut the suite, the batches evaluated also go clean into
    domain ``subset`` (the corruption errors of a cut suite compare the same samples). Returns the rows
    and batches evaluated and whether the budget cut them."""
    limit = BatchLimit(trainer, sizer or PassSizer(OverheadBudget(None), enabled=False), max_batches, share)
    rows = batches = 0
    with isolated_eval(pl_module, trainer) as module:
        for batch_idx, batch in enumerate(loader):
            if batch_idx >= limit.limit:
                break
            batch = trainer.strategy.batch_to_device(batch)
            inputs, target = contract.inputs(batch), contract.target(batch)
            found = first_tensor(inputs)
            device = found.device if found is not None else torch.device("cpu")
            for ci, name in enumerate(corruptions):
                for si, severity in enumerate(severities):
                    generator = torch.Generator(device=device)
                    generator.manual_seed(corruption_seed(seed, trainer.global_rank, batch_idx, ci, severity))
                    x, t = _corrupted(inputs, target, name, severity, generator, value_range, vocabulary)
                    preds = logits_of(call_module(module, x))
                    d = first + ci * len(severities) + si
                    index = torch.full((len(t),), d, dtype=torch.long, device=preds.device)
                    add_predictions(metrics, preds, t, index, shift, prediction_type)
            size = len(torch.as_tensor(target))
            rows, batches = rows + size, batches + 1
            if subset is not None and limit.sizer.enabled:  # the same samples clean (timed with the rest)
                preds = logits_of(call_module(module, inputs))
                index = torch.full((size,), subset, dtype=torch.long, device=preds.device)
                add_predictions(metrics, preds, target, index, shift, prediction_type)
            if batch_idx == 0:
                limit.decide(size)
    return {"samples": rows, "batches": batches, "truncated": limit.cut and batches >= limit.limit}


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
    shift: Optional[int] = None,
    sizer: Optional[PassSizer] = None,
    sources: int = 1,
) -> dict[str, dict[str, Any]]:
    """Add every extra domain's data to ``metrics`` under its name's index in ``names`` (as many batches
    as ``sizer`` affords, each domain its share); each loader is built on first use and kept in
    ``loaders``. Returns each domain's rows and batches evaluated and whether the budget cut them."""
    sizer = sizer or PassSizer(OverheadBudget(None), enabled=False)
    out: dict[str, dict[str, Any]] = {}
    for i, (name, source) in enumerate(domains.items()):
        if name not in loaders:
            loaders[name] = extra_domain_loader(name, source, trainer, pl_module, batch_size)
        d = list(names).index(str(name))
        limit = BatchLimit(trainer, sizer, _length(loaders[name]), 1 / max(sources - i, 1))
        rows = batches = 0
        with isolated_eval(pl_module, trainer) as module:
            for batch_idx, batch in enumerate(loaders[name]):
                if batch_idx >= limit.limit:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                preds = contract.predictions(module, batch)
                target = torch.as_tensor(contract.target(batch), device=preds.device)
                index = torch.full((len(target),), d, dtype=torch.long, device=preds.device)
                add_predictions(metrics, preds, target, index, shift, prediction_type)
                rows, batches = rows + len(target), batches + 1
                if batch_idx == 0:
                    limit.decide(len(target))
        dataset = getattr(loaders[name], "dataset", None)
        available = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        out[str(name)] = {"samples": rows, "samples_available": available, "batches": batches,
                          "truncated": limit.cut and batches >= limit.limit}  # fmt: skip
    return out


def _length(loader: Any) -> float:
    try:
        return float(len(loader))
    except TypeError:
        return math.inf


def run_extra_passes(
    metrics: DomainMetrics,
    pl_module: pl.LightningModule,
    trainer: pl.Trainer,
    testing: bool,
    contract: BatchContract,
    names: Sequence[str],
    loaders: dict[str, Any],
    *,
    corruptions: Sequence[str],
    severities: Sequence[int],
    first: int,
    seed: int,
    value_range: tuple[float, float],
    prediction_type: str,
    vocabulary: Optional[Vocabulary],
    shift: Optional[int],
    domains: Mapping[str, Any],
    batch_size: Optional[int],
    sizer: Optional[PassSizer] = None,
    subset: Optional[int] = None,
) -> dict[str, Any]:
    """Every extra pass of one validation/test pass: the corrupted copies of the batches the stage
    evaluated (its first loader read again, as many batches as the Trainer used) and the extra domains,
    each source as many batches as its share of the budget affords (``sizer``; default: all). Returns
    what each source evaluated (``corruptions``, ``domains``: rows, batches, whether the budget cut it)."""
    sources = (1 if corruptions else 0) + len(domains)
    out: dict[str, Any] = {"corruptions": None, "domains": {}}
    if corruptions:
        loader = first_loader(trainer.test_dataloaders if testing else trainer.val_dataloaders)
        counts = trainer.num_test_batches if testing else trainer.num_val_batches
        if loader is not None and counts:
            out["corruptions"] = evaluate_corruptions(
                metrics, pl_module, trainer, loader, counts[0], contract, corruptions=corruptions,
                severities=severities, first=first, seed=seed, value_range=value_range,
                prediction_type=prediction_type, vocabulary=vocabulary, shift=shift, sizer=sizer,
                share=1 / max(sources, 1), subset=subset,
            )  # fmt: skip
    out["domains"] = evaluate_extra_domains(
        metrics, pl_module, trainer, domains, loaders, names, contract, batch_size=batch_size,
        prediction_type=prediction_type, shift=shift, sizer=sizer, sources=len(domains),
    )  # fmt: skip
    return out
