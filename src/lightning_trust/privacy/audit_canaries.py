"""Input-space canaries of the one-run audit: ``m`` samples of the training set, drawn by a seeded
generator and held out of it, relabeled at random (``labels="random"``: a class other than their own)
or kept as they are (``"true"``), each put back into training with probability 1/2 by a seeded coin.

The training set the run sees is :class:`CanaryDataset`: the real samples minus the ``m`` sources,
plus the included canaries, behind a plain loader that mirrors the user's (batch size, shuffling,
collate function, workers); DP's Poisson loader and Lightning's ``DistributedSampler`` sample it
like any dataset. Every rank draws the same canaries from the seed. After fit every canary, in or
out, is scored by the trained model (:func:`score_canaries`; higher means "more likely trained on").

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.randn(100, 3), torch.arange(100) % 3)
    >>> canaries = InputCanaries(num_canaries=10, seed=0)
    >>> canaries.draw(data, BatchContract(), num_classes=3)
    >>> train = canaries.training_set(data)
    >>> len(train) == 90 + int(canaries.coin.sum()), len(canaries.samples(data))
    (True, 10)
    >>> all(int(s[1]) != int(data[i][1]) for s, i in zip(canaries.samples(data), canaries.sources))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from lightning_trust.core.batch import DEFAULT_TARGET_KEYS, BatchContract, call_module, logits_of
from lightning_trust.core.tensors import map_tensors
from lightning_trust.privacy.loader import loader_options

__all__ = [
    "CanaryDataset",
    "InputCanaries",
    "canary_loader",
    "check_train_loader",
    "class_of",
    "loss_or_margin",
    "score_canaries",
    "with_label",
]


def with_label(sample: Any, contract: BatchContract, label: int) -> Any:
    """A copy of ``sample`` whose target is ``label`` (same type and dtype as the original target)."""
    original = contract.target(sample)
    if isinstance(original, Tensor):
        new: Any = torch.tensor(label, dtype=original.dtype).reshape(original.shape)
    elif isinstance(original, np.generic):
        new = type(original)(label)
    else:
        new = type(original)(label) if isinstance(original, (int, float)) else label
    if isinstance(sample, Mapping):
        key = contract.target_key if isinstance(contract.target_key, str) else None
        key = key or next(k for k in DEFAULT_TARGET_KEYS if k in sample)
        return {**sample, key: new}
    position = contract.target_key if isinstance(contract.target_key, int) else 1
    items = list(sample)
    items[position] = new
    return type(sample)(items) if isinstance(sample, tuple) else items


def class_of(target: Any) -> int:
    """The class of one sample's target; refuses targets that are not one class label."""
    value = torch.as_tensor(target)
    if value.numel() != 1 or value.is_complex():
        raise ValueError(
            f"Input-space canaries relabel samples, which needs one class label per sample; this target has shape "
            f"{tuple(value.shape)}. Use PrivacyAudit(canaries='gradient') under DifferentialPrivacy, or override "
            "PrivacyAudit.canary_score and keep canary_labels='true'."
        )
    label = float(value.reshape(()).item())
    if label != int(label) or label < 0:
        raise ValueError(f"Canary labels must be class indices (0, 1, ...), got the target {label}.")
    return int(label)


class CanaryDataset(Dataset):
    """The training set of an audited run: ``dataset`` without the canary sources, then the included canaries.

    ``original_dataset`` is the user's dataset, for whoever describes the real data (the model card).
    """

    def __init__(self, dataset: Dataset, keep: Sequence[int], canaries: Sequence[Any]) -> None:
        self.original_dataset = dataset
        self.keep = list(keep)
        self.canaries = list(canaries)

    def __len__(self) -> int:
        return len(self.keep) + len(self.canaries)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if index < len(self.keep):
            return self.original_dataset[self.keep[index]]
        return self.canaries[index - len(self.keep)]


class InputCanaries:
    """The coin, sources and labels of ``num_canaries`` input canaries (drawn once, from ``seed``)."""

    def __init__(self, num_canaries: int, seed: int, labels: str = "random") -> None:
        self.num_canaries, self.seed, self.labels_mode = num_canaries, seed, labels
        self.coin = np.zeros(0, dtype=bool)
        self.sources = np.zeros(0, dtype=np.int64)
        self.labels = np.zeros(0, dtype=np.int64)
        self.dataset_size: Optional[int] = None
        self._contract = BatchContract()

    @property
    def drawn(self) -> bool:
        return self.dataset_size is not None

    def draw(self, dataset: Dataset, contract: BatchContract, num_classes: Optional[int]) -> None:
        """Choose the sources, their labels and the coin for ``dataset`` (a restored draw is kept, and checked)."""
        self._contract = contract
        size = len(dataset)  # type: ignore[arg-type]  # map-style, checked by canary_loader
        if self.drawn:
            if size != self.dataset_size:
                raise ValueError(
                    f"The training set has {size} samples, but the audit's canaries were drawn from {self.dataset_size} "
                    "(checkpoint); resume with the same training data."
                )
            return
        m = self.num_canaries
        if 2 * m > size:
            raise ValueError(
                f"PrivacyAudit(num_canaries={m}) needs at most half the training set as canaries, which has {size} "
                f"samples; lower num_canaries to at most {size // 2}."
            )
        rng = np.random.default_rng([self.seed, 3])
        sources = rng.choice(size, size=m, replace=False)
        own = np.array([class_of(contract.target(dataset[int(i)])) for i in sources], dtype=np.int64)
        if self.labels_mode == "random":
            classes = num_classes if num_classes is not None else int(own.max()) + 1
            if classes < 2 or own.max() >= classes:
                raise ValueError(
                    f"Random canary labels need num_classes >= 2 covering the labels, got num_classes={classes} with "
                    f"labels up to {int(own.max())}; pass PrivacyAudit(num_classes=...)."
                )
            labels = (own + rng.integers(1, classes, size=m)) % classes  # any class but the sample's own
        else:
            labels = own
        self.sources, self.labels = sources.astype(np.int64), labels.astype(np.int64)
        self.coin = np.random.default_rng([self.seed, 0]).random(m) < 0.5
        self.dataset_size = size

    def samples(self, dataset: Dataset, which: Optional[np.ndarray] = None) -> list[Any]:
        """The canaries (all, or those where ``which``), in canary order."""
        chosen = range(self.num_canaries) if which is None else np.flatnonzero(which)
        return [with_label(dataset[int(self.sources[i])], self._contract, int(self.labels[i])) for i in chosen]

    def training_set(self, dataset: Dataset) -> CanaryDataset:
        """The audited training set: the real samples but the sources, then the included canaries."""
        held_out = set(self.sources.tolist())
        keep = [i for i in range(len(dataset)) if i not in held_out]  # type: ignore[arg-type]
        return CanaryDataset(dataset, keep, self.samples(dataset, self.coin))

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "coin": self.coin.tolist(),
            "sources": self.sources.tolist(),
            "labels": self.labels.tolist(),
            "dataset_size": self.dataset_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.coin = np.asarray(state["coin"], dtype=bool)
        self.sources = np.asarray(state["sources"], dtype=np.int64)
        self.labels = np.asarray(state["labels"], dtype=np.int64)
        self.dataset_size = state["dataset_size"]
        self.num_canaries = len(self.coin)


def check_train_loader(loader: Any) -> None:
    """Refuse train loaders input canaries cannot join: not one DataLoader over a map-style dataset,
    or a sampler whose weighting or order a rebuilt loader would drop."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "PrivacyAudit adds input canaries to the training set, which needs one train DataLoader over a map-style "
            f"dataset; got {type(loader).__name__}"
            + (f" over {type(loader.dataset).__name__}" if isinstance(loader, DataLoader) else "")
            + ". Use a map-style Dataset, or PrivacyAudit(canaries='gradient') under DifferentialPrivacy."
        )
    sampler = loader.sampler
    if loader.batch_size is None or type(sampler) not in (RandomSampler, SequentialSampler):
        raise ValueError(
            f"The train DataLoader samples with {type(sampler).__name__} (batch_size={loader.batch_size}); PrivacyAudit "
            "rebuilds a plain loader over the training set plus the canaries, which would drop that sampler's "
            "weighting or order. Use DataLoader(dataset, batch_size=..., shuffle=True)."
        )


def canary_loader(loader: DataLoader, dataset: Dataset) -> DataLoader:
    """A loader over ``dataset`` that batches and shuffles like the user's ``loader`` (checked by
    :func:`check_train_loader`)."""
    sampler = loader.sampler
    shuffle = isinstance(sampler, RandomSampler)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=sampler.generator if isinstance(sampler, RandomSampler) else None,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
        **loader_options(loader),
    )


def loss_or_margin(logits: Tensor, labels: Tensor, score: str) -> Tensor:
    """Per-sample score of ``labels`` under ``logits``: ``-loss`` (cross-entropy) or the margin of the
    label's logit over the best other one (one logit per sample: binary, logistic loss)."""
    logits = logits.float()
    labels = labels.reshape(-1).long()
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        z, sign = logits.reshape(-1), labels.float() * 2 - 1
        return -torch.nn.functional.softplus(-sign * z) if score == "loss" else sign * z
    if logits.ndim != 2:
        raise ValueError(
            f"Canary scores need one row of class logits per sample, got logits of shape {tuple(logits.shape)}; "
            "override PrivacyAudit.canary_score for this model."
        )
    if score == "loss":
        return -torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return own - others


def score_canaries(
    module: Any,
    samples: Sequence[Any],
    collate: Callable[[list[Any]], Any],
    contract: BatchContract,
    scorer: Callable[[Tensor, Tensor], Tensor],
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> tuple[Tensor, Tensor]:
    """Scores of this rank's share of ``samples`` (every ``world``-th from ``rank``) in a length-``m``
    tensor, and a mask of the ones it scored; summed over ranks they give every score once."""
    m = len(samples)
    scores = torch.zeros(m, dtype=torch.float64, device=device)
    mine = torch.zeros(m, dtype=torch.float64, device=device)
    indices = list(range(rank, m, world))
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batch = map_tensors(collate([samples[i] for i in chunk]), lambda t: t.to(device))
        logits = logits_of(call_module(module, contract.inputs(batch)))
        values = scorer(logits, torch.as_tensor(contract.target(batch), device=device))
        scores[chunk] = values.detach().double()
        mine[chunk] = 1.0
    return scores, mine
