"""Penultimate-layer embeddings: the input of the classifier head, kept from the forward the step runs.

The head is ``embedding_layer`` (a dotted module path) or, by default, the last registered
``nn.Linear`` whose ``out_features`` is the number of classes (any ``nn.Linear`` when that is unknown) (a Hugging Face classifier's
``classifier``/``score``, an MLP's last layer). Token-level inputs ``(N, T, H)`` are averaged over
the tokens. The reference sample of the training data is embedded in eval mode (an isolated pass
over a seeded subset of the training dataset, never the training loader's own iterator, so the
run's shuffling is untouched).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> name, head = find_head(model, num_classes=3, layer=None)
    >>> capture = InputCapture(head)
    >>> capture.arm(size=5)
    >>> _ = model(torch.ones(5, 4))
    >>> name, capture.take().shape
    ('2', torch.Size([5, 8]))
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_trust.core.batch import BatchContract, call_module
from lightning_trust.core.loaders import first_loader, split_loaders
from lightning_trust.core.passes import isolated_eval

__all__ = ["InputCapture", "find_head", "reference_embeddings"]


def find_head(module: nn.Module, num_classes: Optional[int], layer: Optional[str]) -> tuple[str, nn.Module]:
    """``(name, module)`` of the classifier head whose input is the embedding."""
    named = dict(module.named_modules())
    if layer is not None:
        if layer not in named:
            linear = [n for n, m in named.items() if isinstance(m, nn.Linear)][-5:]
            raise ValueError(
                f"`embedding_layer={layer!r}` is not a submodule of {type(module).__name__}; give the dotted path of "
                f"the classifier head (its input is the embedding), e.g. one of {linear}."
            )
        return layer, named[layer]
    linears = [(n, m) for n, m in named.items() if isinstance(m, nn.Linear)]
    heads = [(n, m) for n, m in linears if num_classes is None or m.out_features == num_classes]
    if not heads:
        raise ValueError(
            f"Cannot find the classifier head of {type(module).__name__}: no nn.Linear with out_features == "
            f"{num_classes} (the number of classes). Set `embedding_layer` to the head's dotted path, or drop the "
            "shift test (`shift_tests=[]`)."
        )
    return heads[-1]


class InputCapture:
    """While armed, keeps the input of the head's first call whose leading size is the batch's."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.value: Optional[Tensor] = None
        self._size: Optional[int] = None
        self._handle: Any = None

    def arm(self, size: Optional[int]) -> None:
        self.disarm()
        self.value, self._size = None, size
        if size is not None:
            self._handle = self.head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.value is None and args and isinstance(args[0], Tensor) and args[0].shape[0] == self._size:
            x = args[0].detach()
            self.value = x.float().mean(dim=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x.float()

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self) -> Optional[Tensor]:
        """Stop listening; the captured embeddings (or ``None``)."""
        self.disarm()
        value, self.value = self.value, None
        return value


def reference_embeddings(
    trainer: Any, pl_module: nn.Module, head: nn.Module, contract: BatchContract, count: int, seed: int
) -> Optional[tuple[Tensor, Tensor]]:
    """``(embeddings, positions)`` of up to ``count`` training samples, in eval mode: the first
    ``count`` of a seeded permutation of the training dataset, this process's share under DDP
    (every ``world_size``-th), with each sample's position in the permutation (sorting the gathered
    shares by it gives the order one process embeds them in); ``None`` without a map-style dataset."""
    loader = first_loader(split_loaders(trainer, "train"))
    dataset = getattr(loader, "dataset", None)
    if loader is None or dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    positions = list(range(min(count, len(dataset))))[trainer.global_rank :: trainer.world_size]
    share = [order[p] for p in positions]
    subset = DataLoader(Subset(dataset, share), batch_size=loader.batch_size or 64, collate_fn=loader.collate_fn)
    capture = InputCapture(head)
    out: list[Tensor] = []
    kept: list[int] = []
    start = 0
    with isolated_eval(pl_module, trainer) as module:
        for batch in subset:
            batch = trainer.strategy.batch_to_device(batch)
            size = len(contract.target(batch))
            capture.arm(size)
            call_module(module, contract.inputs(batch))
            value = capture.take()
            if value is not None:
                out.append(value)
                kept.extend(positions[start : start + size])
            start += size
    if not out:
        return None
    return torch.cat(out), torch.tensor(kept, dtype=torch.long)
