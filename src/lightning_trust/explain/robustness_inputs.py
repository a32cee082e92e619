"""What :class:`~lightning_trust.explain.AdversarialRobustness` attacks: its fixed sample (any model
inputs read through the batch contract: a tensor, a dict of keyword inputs, positional inputs) and
the space it perturbs.

* Float inputs (images, tabular rows, a dict's ``pixel_values``) are attacked in input space; the
  other model inputs are passed along unchanged (Captum's ``additional_forward_args``).
* Integer token ids are attacked in embedding space, the standard for text (FreeLB, Miyato et al.):
  the output of the input embedding layer (``get_input_embeddings()``) is replaced by the perturbed
  embeddings, exactly what Hugging Face models compute from ``inputs_embeds``, while the user's own
  ``forward`` runs unchanged on the ids and mask; padding is never perturbed.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.randn(40, 3), torch.tensor([0, 1] * 20)), batch_size=8)
    >>> sample = draw_attack_sample(loader, BatchContract(), num_samples=6, seed=0)
    >>> sample.targets.tolist(), tuple(sample.inputs.shape)
    ([0, 0, 0, 1, 1, 1], (6, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset, default_collate

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.calls import PositionalInputs, ScoresModule, call_module
from lightning_trust.core.passes import fork_rngs
from lightning_trust.core.tensors import map_tensors
from lightning_trust.explain.sample import stratified_indices

__all__ = [
    "AttackSample", "AttackSpace", "attack_loss", "attack_space", "correct", "draw_attack_sample",
    "find_input_embeddings", "min_perturbation", "take_rows", "token_ids",
]  # fmt: skip

IGNORE_INDEX = -100


@dataclass
class AttackSample:
    """The fixed sample: ``inputs`` (a tensor, a dict of tensors or :class:`PositionalInputs`),
    ``targets`` (``None`` when the batches have none) and their dataset indices."""

    inputs: Any
    targets: Optional[Tensor]
    indices: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.indices)

    def state(self) -> dict[str, Any]:
        inputs = self.inputs
        positional = isinstance(inputs, PositionalInputs)
        return {"inputs": list(inputs) if positional else inputs, "positional": positional,
                "targets": self.targets, "indices": list(self.indices), "source": self.source}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AttackSample:
        inputs = PositionalInputs(state["inputs"]) if state.get("positional") else state["inputs"]
        return cls(inputs, state.get("targets"), list(state["indices"]), state.get("source", "val"))


def take_rows(inputs: Any, index: Any) -> Any:
    """Rows ``index`` of every input tensor."""
    if isinstance(inputs, PositionalInputs):
        return PositionalInputs(take_rows(x, index) for x in inputs)
    return map_tensors(inputs, lambda t: t[index])


def _cat(parts: Sequence[Any]) -> Any:
    first = parts[0]
    if isinstance(first, PositionalInputs):
        return PositionalInputs(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first if isinstance(first[k], Tensor)}
    return torch.cat(list(parts))


def draw_attack_sample(
    loader: DataLoader, contract: BatchContract, num_samples: int, seed: int, stratify: bool = True,
    pool_size: int = 4096, source: str = "val",
) -> AttackSample:  # fmt: skip
    """``num_samples`` samples of ``loader``'s dataset (a seeded pool of at most ``pool_size``
    positions, then stratified by class when the targets are class labels), read with the contract."""
    generator = np.random.default_rng(seed)
    dataset = loader.dataset
    with fork_rngs(devices=[]):  # iterating a loader draws from torch's global RNG
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            batches, pool = list(_first(loader, contract, pool_size)), None
        else:
            n = len(dataset)
            if n == 0:
                raise ValueError(f"The {source} dataset is empty: there is nothing to attack.")
            pool = np.sort(generator.choice(n, size=min(n, pool_size), replace=False))
            collate = loader.collate_fn if loader.batch_size is not None else default_collate
            sub = DataLoader(Subset(dataset, pool.tolist()), batch_size=512, shuffle=False, collate_fn=collate)
            batches = list(sub)
    inputs = _cat([map_tensors(contract.inputs(b), lambda t: t.detach().cpu()) for b in batches])
    has_target = all(contract.has_target(b) for b in batches)
    targets = torch.cat([torch.as_tensor(contract.target(b)).cpu() for b in batches]) if has_target else None
    size = len(targets) if targets is not None else len(_first_tensor(inputs))
    if pool is None:
        pool = np.arange(size)
    picked = stratified_indices(targets if stratify else None, num_samples, generator, size=size)
    index = torch.as_tensor(picked, dtype=torch.long)
    return AttackSample(
        take_rows(inputs, index), targets[index].contiguous() if targets is not None else None,
        [int(pool[i]) for i in picked], source,
    )  # fmt: skip


def _first(loader: DataLoader, contract: BatchContract, limit: int) -> Iterator[Any]:
    count = 0
    for batch in loader:
        yield batch
        count += len(_first_tensor(contract.inputs(batch)))
        if count >= limit:
            return


def _first_tensor(inputs: Any) -> Tensor:
    if isinstance(inputs, PositionalInputs):
        return _first_tensor(inputs[0])
    if isinstance(inputs, Mapping):
        return next(v for v in inputs.values() if isinstance(v, Tensor))
    return inputs


def token_ids(inputs: Any) -> Optional[Tensor]:
    """The integer token ids of the inputs (a dict's ``input_ids``, an integer tensor), or ``None``."""
    if isinstance(inputs, PositionalInputs):
        inputs = inputs[0]
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input_ids")
    if (
        isinstance(inputs, Tensor)
        and inputs.ndim == 2
        and not inputs.is_floating_point()
        and inputs.dtype != torch.bool
    ):
        return inputs
    return None


def find_input_embeddings(module: nn.Module) -> Optional[nn.Module]:
    """The token embedding layer: ``get_input_embeddings()`` of the module or of a submodule (a Hugging
    Face or PEFT model inside a LightningModule)."""
    for sub in module.modules():
        getter = getattr(sub, "get_input_embeddings", None)
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(found, nn.Module):
                return found
    return None


@dataclass
class AttackSpace:
    """How to attack a sample: ``start`` (the tensor perturbed), ``extras`` (the other forward
    arguments, row-aligned), ``mask`` (1 where a perturbation may go) and ``forward(x, *extras)``."""

    kind: str  # "inputs" or "embeddings"
    start: Tensor
    extras: tuple[Tensor, ...]
    mask: Optional[Tensor]
    forward: Callable[..., Tensor]


def attack_space(module: nn.Module, inputs: Any, embedding: Optional[nn.Module]) -> AttackSpace:
    """The attack space of ``inputs`` on ``module`` (already on the inputs' device, in eval mode)."""
    scores = ScoresModule(module)
    ids = token_ids(inputs)
    if ids is not None:
        if embedding is None:
            raise ValueError("token inputs need the input embedding layer")
        return _embedding_space(scores, inputs, ids, embedding)
    if isinstance(inputs, Tensor):
        return AttackSpace("inputs", inputs, (), None, scores)
    if isinstance(inputs, PositionalInputs):
        return AttackSpace("inputs", inputs[0], tuple(inputs[1:]), None, scores)
    key = (
        "pixel_values"
        if "pixel_values" in inputs
        else next(k for k, v in inputs.items() if isinstance(v, Tensor) and v.is_floating_point())
    )
    names = [k for k in inputs if k != key]

    def keyword_forward(x: Tensor, *extras: Tensor) -> Tensor:
        return call_module(scores, {key: x, **dict(zip(names, extras))})

    return AttackSpace("inputs", inputs[key], tuple(inputs[k] for k in names), None, keyword_forward)


def _embedding_space(scores: nn.Module, inputs: Any, ids: Tensor, embedding: nn.Module) -> AttackSpace:
    with torch.no_grad():
        clean = embedding(ids).detach()
    names = list(inputs) if isinstance(inputs, Mapping) else []
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    token_mask = (mask if isinstance(mask, Tensor) else torch.ones_like(ids)).to(clean.dtype)
    extras = tuple(inputs[k] for k in names) if names else (ids,)

    def embedding_forward(embeds: Tensor, *extras: Tensor) -> Tensor:
        call_inputs: Any = dict(zip(names, extras)) if names else extras[0]
        with _replaced_output(embedding, embeds):
            return call_module(scores, call_inputs)

    return AttackSpace("embeddings", clean, extras, token_mask[..., None].expand_as(clean), embedding_forward)


@contextmanager
def _replaced_output(layer: nn.Module, value: Tensor) -> Iterator[None]:
    handle = layer.register_forward_hook(lambda _m, _a, _o: value)
    try:
        yield
    finally:
        handle.remove()


def attack_loss(shift: Optional[int]) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-sample loss for Captum's attacks: cross-entropy of class logits, or the summed token
    cross-entropy of labelled tokens (``shift``: logits at ``t`` against the label at ``t + shift``)."""

    def loss(outputs: Tensor, target: Tensor) -> Tensor:
        if target.ndim == 1:
            return F.cross_entropy(outputs, target, reduction="none")
        logits, labels = _aligned(outputs, target, shift or 0)
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return ce.sum(dim=1)

    return loss


def _aligned(outputs: Tensor, target: Tensor, shift: int) -> tuple[Tensor, Tensor]:
    logits = outputs.reshape(target.shape[0], target.shape[1], -1)
    return (logits[:, :-shift], target[:, shift:]) if shift else (logits, target)


def correct(outputs: Tensor, target: Tensor, shift: Optional[int]) -> Tensor:
    """Which predictions are right: per sample, or per labelled token (flattened)."""
    if target.ndim == 1:
        return outputs.argmax(dim=-1) == target
    logits, labels = _aligned(outputs, target, shift or 0)
    return (logits.argmax(dim=-1) == labels)[labels != IGNORE_INDEX]


def min_perturbation(
    space: AttackSpace, fgsm: Any, x: Tensor, y: Tensor, clean_correct: Tensor, bar: Any, max_epsilon: float,
    samples: int, size: Optional[Callable[[int, int], int]] = None,
) -> dict[str, Any]:  # fmt: skip
    """Captum's ``MinParamPerturbation``: the smallest FGSM epsilon (binary search up to ``max_epsilon``)
    that flips each of the first ``samples`` clean-correct samples, summarized. ``size(searched, wanted)``:
    after the first search, how many of the ``wanted`` are searched in all (the overhead budget)."""
    from captum.robust import MinParamPerturbation

    upper = max_epsilon or 1.0
    search = MinParamPerturbation(
        forward_func=space.forward, attack=fgsm, arg_name="epsilon", arg_min=0.0, arg_max=upper,
        arg_step=upper / 64, mode="binary",
    )  # fmt: skip
    found: list[float] = []
    searched = 0
    candidates = torch.nonzero(clean_correct).flatten()[:samples].tolist()
    limit = len(candidates)
    for i in candidates:
        if searched >= limit:
            break
        xi, yi = x[i : i + 1], y[i : i + 1]
        extra = tuple(e[i : i + 1] for e in space.extras) or None
        kwargs: dict[str, Any] = {"target": yi, "additional_forward_args": extra}
        if space.mask is not None:
            kwargs["mask"] = space.mask[i : i + 1]
        _, eps = search.evaluate(
            xi.clone().requires_grad_(), additional_forward_args=extra, target=yi, attack_kwargs=kwargs
        )
        searched += 1
        if eps is not None:
            found.append(float(eps))
        bar.advance()
        if searched == 1 and size is not None:
            limit = size(1, len(candidates))
    return {
        "attack": "fgsm",
        "searched": searched,
        "wanted": len(candidates),
        "found_fraction": len(found) / searched if searched else None,
        "median": float(np.median(found)) if found else None,
        "mean": float(np.mean(found)) if found else None,
        "max_epsilon": upper,
    }
