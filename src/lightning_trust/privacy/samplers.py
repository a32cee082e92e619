"""Batch samplers the DP callback puts in front of the user's dataset (all built on Opacus's samplers)."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch.utils.data import Sampler


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


class VirtualBatchSampler(BatchSplittingSampler):
    """Opacus's ``BatchSplittingSampler`` (one logical Poisson batch split into physical batches of at
    most ``max_batch_size``, the optimizer told to skip the step on all but the last), with no length.

    The number of physical batches in an epoch is random; an estimated ``len`` would make Lightning
    end the epoch in the middle of a logical batch. Without ``__len__`` the epoch ends when the
    Poisson sampler is exhausted, always on a logical-batch boundary.
    """

    def __len__(self) -> int:
        raise TypeError("the number of physical batches of a Poisson-sampled epoch is random")


class AccumulationSampler(Sampler[list[int]]):
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
