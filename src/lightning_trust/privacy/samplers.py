"""Batch samplers the DP callback puts in front of the user's dataset (all built on Opacus's
samplers), and the user samplers it may replace without changing what the user asked for.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler
    >>> data = TensorDataset(torch.randn(8, 2))
    >>> non_uniform_sampling(DataLoader(data, batch_size=4, shuffle=True)) is None
    True
    >>> non_uniform_sampling(DataLoader(data, batch_size=4, sampler=WeightedRandomSampler([1.0] * 8, 8)))
    'sampler=WeightedRandomSampler'
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any, Optional

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, Sampler, SequentialSampler

#: Samplers that draw every example alike (one epoch, each once), so Poisson sampling replaces them faithfully.
UNIFORM_SAMPLERS = (RandomSampler, SequentialSampler, DistributedSampler)


def non_uniform_sampling(loader: Any) -> Optional[str]:
    """What in ``loader`` samples other than uniformly over the dataset (``"sampler=..."``,
    ``"batch_sampler=..."``), or ``None``: its own ``batch_sampler``, a sampler other than the plain
    random/sequential/distributed ones (exact types: a subclass may reorder or reweight), or a
    ``RandomSampler`` drawing a different number of samples than the dataset holds."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:
        return None
    if type(batch_sampler) is not BatchSampler:
        return f"batch_sampler={type(batch_sampler).__name__}"
    sampler = batch_sampler.sampler
    if type(sampler) not in UNIFORM_SAMPLERS:
        return f"sampler={type(sampler).__name__}"
    if isinstance(sampler, RandomSampler) and sampler.num_samples != len(sampler.data_source):
        return f"sampler=RandomSampler(num_samples={sampler.num_samples})"
    return None


class EvenDistributedPoissonSampler(DistributedUniformWithReplacementSampler):
    """Opacus's distributed Poisson sampler, but an empty draw is yielded as an empty batch.

    Opacus's ``DistributedUniformWithReplacementSampler`` silently drops empty draws, so two ranks
    can see a different number of batches, and the DDP collectives (Lightning's and the
    ``DistributedDPOptimizer``'s all-reduce) then wait forever. An empty draw is a legitimate
    Poisson outcome that must still be one (noise-only) step, so it is kept.
    """

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        indices = indices[self.rank : self.total_size : self.num_replicas]
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield indices[mask.nonzero(as_tuple=False).reshape(-1)].tolist()


class _ForwardsEpoch:
    """Pass Lightning's ``set_epoch`` on to the wrapped sampler (the distributed one reshuffles shards)."""

    sampler: Any

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)


class VirtualBatchSampler(_ForwardsEpoch, BatchSplittingSampler):
    """Opacus's ``BatchSplittingSampler`` with a fixed number of physical batches per logical batch.

    Each logical (Poisson) batch is split into ``parts`` physical batches; the optimizer is told (in
    sampling order, which is also stepping order) to skip the step on all but the last, so it clips and
    accumulates per physical batch and adds noise once per logical batch. A fixed ``parts`` (rather
    than Opacus's ``ceil(len(batch) / max_batch_size)``) keeps every DDP rank stepping together and the
    epoch length exact; :meth:`parts_for` picks it so physical batches stay within ``max_batch_size``
    unless a Poisson batch is more than three standard deviations above its expected size.
    """

    def __init__(self, *, sampler: Any, max_batch_size: int, optimizer: Any, parts: int) -> None:
        super().__init__(sampler=sampler, max_batch_size=max_batch_size, optimizer=optimizer)
        self.parts = parts

    @staticmethod
    def parts_for(expected_batch_size: float, max_batch_size: int) -> int:
        """Physical batches per logical batch of ``expected_batch_size`` (Poisson) samples."""
        high = expected_batch_size + 3.0 * math.sqrt(max(expected_batch_size, 0.0))
        return max(1, math.ceil(high / max_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            chunks = np.array_split(np.asarray(list(batch), dtype=np.int64), self.parts)
            for index, chunk in enumerate(chunks):
                self.optimizer.signal_skip_step(do_skip=index < self.parts - 1)
                yield chunk.tolist()

    def __len__(self) -> int:
        return len(self.sampler) * self.parts


class AccumulationSampler(_ForwardsEpoch, Sampler[list[int]]):
    """Split every logical batch of ``sampler`` into exactly ``parts`` physical batches.

    Used with ``Trainer(accumulate_grad_batches=parts)``: each sample of a logical (Poisson) batch is
    seen once, Lightning accumulates the ``parts`` backward passes, and one noisy step is taken.
    """

    def __init__(self, sampler: Any, parts: int) -> None:
        self.sampler = sampler
        self.parts = parts

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            for chunk in np.array_split(np.asarray(list(batch), dtype=np.int64), self.parts):
                yield chunk.tolist()

    def __len__(self) -> int:
        if not isinstance(self.sampler, Sized):
            raise TypeError("the wrapped sampler has no length")
        return len(self.sampler) * self.parts
