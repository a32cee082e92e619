"""The private train loader: the user's DataLoader replaced by its Poisson-sampled equivalent
(Opacus's ``DPDataLoader``, distributed-aware under DDP), keeping the dataset, ``collate_fn`` and
workers, and installed in the fit loop through the seam.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> user = DataLoader(TensorDataset(torch.randn(240, 4)), batch_size=24, shuffle=True)
    >>> dataset, size, batch_size = training_set(user, dataset_size=None, poisson_sampling=True, delta_known=True)
    >>> private = poisson_loader(user, sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    >>> size, batch_size, type(private.batch_sampler).__name__, len(private)
    (240, 24, 'UniformWithReplacementSampler', 10)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from typing import Any, Optional

import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_trust.core.seam import restore_train_loader, swap_train_loader
from lightning_trust.privacy.empty import EmptyDrawCollate
from lightning_trust.privacy.samplers import (
    AccumulationSampler,
    EvenDistributedPoissonSampler,
    VirtualBatchSampler,
    non_uniform_sampling,
)

__all__ = [
    "install",
    "loader_options",
    "noise_generator",
    "poisson_loader",
    "sampling_generator",
    "training_set",
    "uninstall",
]


def training_set(
    loader: Any, dataset_size: Optional[int], poisson_sampling: bool, delta_known: bool
) -> tuple[Dataset[Any], int, int]:
    """``(dataset, N, batch size)`` of the user's train loader, refusing what DP cannot sample.

    ``dataset_size`` overrides ``len(dataset)`` (for an ``IterableDataset``); ``delta_known``: a δ
    was given, so an unknown N needs no ``1 / N`` default.
    """
    if not isinstance(loader, DataLoader):
        raise ValueError(
            f"DifferentialPrivacy needs exactly one train DataLoader, got {type(loader).__name__}; "
            "combine several datasets into one Dataset first."
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) and poisson_sampling:
        raise ValueError(
            f"The train loader reads an IterableDataset ({type(dataset).__name__}), which cannot be Poisson sampled, "
            "and the DP guarantee assumes Poisson sampling. Use a map-style Dataset, or accept a guarantee that "
            "assumes shuffling with `DifferentialPrivacy(poisson_sampling=False, dataset_size=N)`."
        )
    unusual = non_uniform_sampling(loader) if poisson_sampling else None
    if unusual is not None:
        raise ValueError(
            f"The train DataLoader samples with {unusual}, not uniformly. DifferentialPrivacy replaces the loader's "
            "sampling by Poisson sampling (each example joins a batch with the same probability q), which the "
            "privacy accountant assumes, so this sampler's weighting or order would be dropped without a word. Use "
            "a plain DataLoader(dataset, batch_size=..., shuffle=True) (reweight through the loss instead), or keep "
            "your sampler with DifferentialPrivacy(poisson_sampling=False): the report then states that the "
            "guarantee assumes Poisson sampling that was not done."
        )
    size = dataset_size
    if size is None:
        try:
            size = len(dataset)  # type: ignore[arg-type]  # map-style datasets have a length
        except TypeError:
            size = None
    if size is None and not delta_known:
        raise ValueError(
            "No `target_delta` was given and the training set size is unknown (the dataset has no len), so the "
            "default δ = 1/N cannot be set. Pass `target_delta` (e.g. 1e-5) or `dataset_size`."
        )
    if size is None:
        raise ValueError(
            "The training set size N is needed for the sample rate; pass `DifferentialPrivacy(dataset_size=N)`."
        )
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if (
        not batch_size
        and not poisson_sampling
        and isinstance(loader.batch_sampler, Sized)
        and len(loader.batch_sampler)
    ):
        batch_size = math.ceil(int(size) / len(loader.batch_sampler))  # the user's own batches: their mean size
    if not batch_size:
        raise ValueError(
            "The train DataLoader needs a `batch_size` (the expected Poisson batch size); pass "
            "DataLoader(dataset, batch_size=...)."
        )
    return dataset, int(size), int(batch_size)


def noise_generator(secure_rng: bool) -> Optional[torch.Generator]:
    """The generator of the optimizer's noise: ``torchcsprng``'s with ``secure_rng``, else torch's global one."""
    if not secure_rng:
        return None
    import torchcsprng

    return torchcsprng.create_random_device_generator("/dev/urandom")


def sampling_generator(global_rank: int, secure_rng: bool) -> torch.Generator:
    """The generator of the Poisson draws: seeded from torch's global RNG (one per rank), or ``torchcsprng``'s."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + global_rank)
    secure = noise_generator(secure_rng)
    return secure if secure is not None else generator


def loader_options(loader: DataLoader[Any]) -> dict[str, Any]:
    """The worker settings of ``loader`` (workers, pinning, timeout, worker init, context), for a loader
    that samples differently over the same or an extended dataset."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return options


def poisson_loader(
    loader: DataLoader[Any],
    sample_rate: float,
    generator: torch.Generator,
    world_size: int = 1,
    max_physical_batch_size: Optional[int] = None,
    optimizer: Any = None,
    physical_parts: int = 1,
    accumulate: int = 1,
    dataset_size: Optional[int] = None,
) -> DataLoader[Any]:
    """The Poisson-sampled equivalent of ``loader`` at ``sample_rate`` (global, over all ranks).

    Under DDP each rank samples its own shard and yields empty draws too, so ranks step together;
    with ``max_physical_batch_size`` each logical batch is split into ``physical_parts`` physical
    batches (``optimizer`` skips the step on all but the last); with ``accumulate > 1`` into
    ``accumulate`` parts for Lightning's gradient accumulation. ``dataset_size``: N when it is not
    ``len(dataset)``.
    """
    dataset = loader.dataset
    options = loader_options(loader)
    dp_loader: DataLoader[Any] = DPDataLoader(
        dataset,
        sample_rate=sample_rate,
        collate_fn=loader.collate_fn,
        generator=generator,
        distributed=world_size > 1,
        **options,
    )
    # an empty draw (even the first) is the user's batch structure with zero rows, not Opacus's fallback
    dp_loader.collate_fn = EmptyDrawCollate(loader.collate_fn, dataset)
    batch_sampler: Any = dp_loader.batch_sampler
    if world_size > 1:
        size = dataset_size if dataset_size is not None else len(dataset)  # type: ignore[arg-type]  # map-style
        batch_sampler = EvenDistributedPoissonSampler(total_size=size, sample_rate=sample_rate, generator=generator)
    if max_physical_batch_size is not None:
        batch_sampler = VirtualBatchSampler(
            sampler=batch_sampler, max_batch_size=max_physical_batch_size, optimizer=optimizer, parts=physical_parts
        )
    elif accumulate > 1:
        batch_sampler = AccumulationSampler(batch_sampler, accumulate)
    if batch_sampler is not dp_loader.batch_sampler:
        dp_loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=dp_loader.collate_fn, **options)
    return dp_loader


def install(trainer: Any, owner: Any, wrap: Callable[[Any], Any], is_private: Callable[[Any], bool]) -> None:
    """Make the fit loop train on ``wrap(user's train loader)``; ``is_private(loader)`` tells the
    loaders that are distributed already, so Lightning injects no ``DistributedSampler`` into them."""
    swap_train_loader(trainer, owner, wrap, sharded=is_private)


def uninstall(trainer: Any, owner: Any) -> None:
    """Give the fit loop the user's train loader back."""
    restore_train_loader(trainer, owner)
