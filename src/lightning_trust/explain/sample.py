"""The fixed, seeded sample the explain callbacks work on: drawn once, stratified by class.

Example:
    >>> import numpy as np, torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> labels = torch.tensor([0] * 90 + [1] * 10)
    >>> picked = stratified_indices(labels, 10, np.random.default_rng(0))
    >>> int((labels[picked] == 1).sum())
    5
    >>> loader = DataLoader(TensorDataset(torch.randn(100, 3), labels), batch_size=16)
    >>> sample = draw_sample(loader, BatchContract(), num_samples=8, seed=0)
    >>> sample.inputs.shape, sample.targets.tolist()
    (torch.Size([8, 3]), [0, 0, 0, 0, 1, 1, 1, 1])
    >>> interleave_classes(torch.tensor([0, 0, 0, 1, 1, 2])).tolist()  # each prefix balanced over classes
    [0, 3, 5, 1, 4, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.loaders import find_loader
from lightning_trust.core.passes import fork_rngs
from lightning_trust.explain.inputs import Key, split_inputs

__all__ = [
    "FixedSample",
    "draw_fixed_sample",
    "draw_reference",
    "draw_sample",
    "interleave_classes",
    "stratified_indices",
]


@dataclass
class FixedSample:
    """Samples drawn once: ``inputs`` and (when the batch has one) ``targets``, with their dataset indices.

    With several model inputs, ``inputs`` is the attributed one, ``key`` its keyword (or position
    ``0``) and ``others`` the other inputs by keyword (or position), row-aligned with ``inputs``.
    """

    inputs: Tensor
    targets: Optional[Tensor]
    indices: list[int]
    source: str
    key: Key = None
    others: dict[Any, Tensor] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (see :meth:`from_state`)."""
        return {
            "inputs": self.inputs, "targets": self.targets, "indices": list(self.indices), "source": self.source,
            "key": self.key, "others": dict(self.others),
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FixedSample:
        return cls(
            state["inputs"], state.get("targets"), list(state["indices"]), state.get("source", "val"),
            state.get("key"), dict(state.get("others") or {}),
        )  # fmt: skip


def _collated(loader: DataLoader, indices: Sequence[int]) -> Iterator[Any]:
    """Batches of ``loader.dataset[indices]`` collated like the user's loader (no shuffling)."""
    sub = DataLoader(Subset(loader.dataset, list(indices)), batch_size=512, shuffle=False, collate_fn=loader.collate_fn)
    yield from sub


def _read(
    batches: Iterable[Any], contract: BatchContract, limit: Optional[int] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """The single input tensor and the targets of ``batches`` (raises ``TypeError`` on several inputs)."""
    _, x, _, y = _read_parts(batches, contract, limit, single=True)
    return x, y


def _read_parts(
    batches: Iterable[Any],
    contract: BatchContract,
    limit: Optional[int] = None,
    single: bool = False,
    choose: Optional[str] = None,
) -> tuple[Key, Tensor, dict[Any, Tensor], Optional[Tensor]]:
    """``(key, attributed inputs, other inputs, targets)`` of ``batches`` (see :func:`split_inputs`)."""
    inputs: list[Tensor] = []
    others: dict[Any, list[Tensor]] = {}
    key: Key = None
    targets: list[Tensor] = []
    has_target = True
    count = 0
    for batch in batches:
        x = contract.inputs(batch)
        if single and not isinstance(x, Tensor):
            raise TypeError(
                f"The explain callbacks need a single input tensor per batch, got {type(x).__name__}; point "
                "`batch_keys: {input: <key>}` at the model's input tensor."
            )
        key, x, rest = split_inputs(x, choose)
        for name, value in rest.items():
            others.setdefault(name, []).append(value.detach().cpu())
        inputs.append(x.detach().cpu())
        target = contract.target(batch) if has_target and contract.has_target(batch) else None
        if isinstance(target, Tensor):
            targets.append(target.detach().cpu())
        else:
            has_target = False
        count += len(x)
        if limit is not None and count >= limit:
            break
    if not inputs:
        raise ValueError("The data to explain is empty.")
    x = torch.cat(inputs)
    y = torch.cat(targets) if has_target and targets else None
    rest = {name: torch.cat(values) for name, values in others.items()}
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
        rest = {name: value[:limit] for name, value in rest.items()}
    return key, x, rest, y


def stratified_indices(
    targets: Optional[Tensor], num: int, generator: np.random.Generator, size: Optional[int] = None
) -> np.ndarray:
    """``num`` of ``size`` positions, balanced over classes (round-robin over a seeded shuffle of each
    class) when ``targets`` are integer class labels; a seeded random choice otherwise. Sorted by class."""
    n = len(targets) if targets is not None else int(size or 0)
    if targets is None or targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
        return np.sort(generator.choice(n, size=min(num, n), replace=False)) if n else np.arange(0)
    labels = targets.numpy()
    classes = np.unique(labels)
    queues = [list(generator.permutation(np.flatnonzero(labels == c))) for c in classes]
    chosen: list[int] = []
    while len(chosen) < min(num, n):
        for queue in queues:
            if queue and len(chosen) < num:
                chosen.append(int(queue.pop(0)))
    chosen_arr = np.array(chosen, dtype=np.int64)
    return chosen_arr[np.lexsort((chosen_arr, labels[chosen_arr]))]


def draw_sample(
    loader: DataLoader,
    contract: BatchContract,
    num_samples: int,
    seed: int,
    stratify: bool = True,
    pool_size: Optional[int] = None,
    source: str = "val",
    keyword: bool = False,
    choose: Optional[str] = None,
) -> FixedSample:
    """Draw ``num_samples`` fixed samples from ``loader``'s dataset through the batch contract.

    A map-style dataset is read at a seeded pool of at most ``pool_size`` positions (default: 16 per
    sample, at least 512, at most 4096; reading the pool can cost more than explaining it) (the
    loader's own sampler, shuffling or DDP sharding play no part, so every rank and every run draws the same);
    an iterable dataset gives its first ``pool_size`` samples. Within the pool the sample is
    stratified by class when the batch has integer class targets. ``keyword``: the inputs may be
    several (keyword or positional); ``choose`` names the attributed one (see :func:`split_inputs`).
    """
    generator = np.random.default_rng(seed)
    dataset = loader.dataset
    pool_size = pool_size if pool_size is not None else min(4096, max(512, 16 * num_samples))
    # iterating a DataLoader draws its base seed from torch's global RNG: fork it, so that drawing the
    # sample leaves no trace on training (DP noise, dropout, shuffling)
    with fork_rngs(devices=[]):
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            key, x, rest, y = _read_parts(loader, contract, pool_size, single=not keyword, choose=choose)
            pool = np.arange(len(x))
        else:
            n = len(dataset)
            if n == 0:
                raise ValueError(f"The {source} dataset is empty: there is nothing to explain.")
            pool = np.sort(generator.choice(n, size=min(n, pool_size), replace=False))
            key, x, rest, y = _read_parts(_collated(loader, pool.tolist()), contract, None, not keyword, choose)
    picked = stratified_indices(y if stratify else None, num_samples, generator, size=len(x))
    index = torch.as_tensor(picked, dtype=torch.long)
    return FixedSample(
        inputs=x[index].contiguous(),
        targets=y[index].contiguous() if y is not None else None,
        indices=[int(pool[i]) for i in picked],
        source=source,
        key=key,
        others={name: value[index].contiguous() for name, value in rest.items()},
    )


def _class_labels(targets: Optional[Tensor]) -> bool:
    return targets is not None and targets.ndim == 1 and not targets.is_floating_point() and targets.dtype != torch.bool


def interleave_classes(targets: Tensor) -> Tensor:
    """The order of a sample that takes the classes in turn (the first of each class, then the second
    of each...), each class's samples in their order: every prefix is as balanced over classes as it
    can be, so a pass cut to a prefix (the budget) explains a stratified sample."""
    labels = targets.tolist()
    rank: dict[Any, int] = {}
    keys = []
    for i, label in enumerate(labels):
        rank[label] = rank.get(label, -1) + 1
        keys.append((rank[label], label, i))
    return torch.tensor([i for _, _, i in sorted(keys)], dtype=torch.long)


def sample_classes(sample: FixedSample) -> int:
    """The classes a sample's class-label targets hold (0 without them)."""
    targets = sample.targets
    return len(set(targets.tolist())) if targets is not None and _class_labels(targets) else 0


def draw_fixed_sample(
    trainer: Any, contract: BatchContract, num_samples: int, seed: int, stratify: bool, choose: Optional[str]
) -> FixedSample:
    """The fixed sample of the Trainer's validation data (else its test data), keyword inputs allowed;
    stratified, it takes the classes in turn (:func:`interleave_classes`)."""
    loader, kind = find_loader(trainer, ("val", "test"))
    if loader is None:
        raise RuntimeError(
            "Attribution found no validation (or test) DataLoader to draw its samples from; give the "
            "Trainer validation data or a datamodule with `val_dataloader`."
        )
    sample = draw_sample(loader, contract, num_samples, seed, stratify, source=kind, keyword=True, choose=choose)
    if not (stratify and _class_labels(sample.targets)):
        return sample
    assert sample.targets is not None
    order = interleave_classes(sample.targets)
    return FixedSample(
        sample.inputs[order].contiguous(), sample.targets[order].contiguous(), [sample.indices[i] for i in order],
        sample.source, sample.key, {name: value[order].contiguous() for name, value in sample.others.items()},
    )  # fmt: skip


def draw_reference(
    trainer: Any, contract: BatchContract, size: int, seed: int, choose: Optional[str], baseline: str
) -> Tensor:
    """``size`` training inputs (unstratified) for a ``baseline`` drawn from training data."""
    loader, kind = find_loader(trainer, ("train",))
    if loader is None:
        raise RuntimeError(f"baseline={baseline!r} needs training data; none is attached to the Trainer.")
    return draw_sample(loader, contract, size, seed, stratify=False, source=kind, keyword=True, choose=choose).inputs
