"""Text perturbations at severities 1-5: the corruption suite for token inputs.

Every perturbation works on integer token ids ``(N, L)`` (a tensor, or the ``input_ids`` of a dict of
model keyword inputs, whose ``attention_mask``/``token_type_ids`` follow), is deterministic for a
given ``torch.Generator`` and never touches padding or special tokens (``[CLS]``, ``[SEP]``, ...):

* ``token_dropout``: each word token is deleted with probability ``p`` and the rest shift left,
  padded at the end, the attention mask updated (a per-token target follows; dropped: ignored);
* ``word_swap``: each word token is replaced with probability ``p`` by a random id of the training
  vocabulary (the tokenizer's ``len``, else the embedding rows), specials excluded;
* ``char_noise``: each word of the decoded text gets, with probability ``p``, one character edit
  (swap, delete, insert or substitute); the text is re-encoded. Needs a tokenizer with
  ``encode``/``decode`` (e.g. ``AdultTextDataModule.tokenizer``). With a word-level tokenizer a
  misspelt word becomes ``[UNK]``, as a typo does for a fixed vocabulary.

Example:
    >>> vocab = Vocabulary(size=20, pad_token_id=0, special_ids=frozenset({0, 1, 2, 3}))
    >>> ids = torch.tensor([[2, 7, 8, 9, 3, 0]])
    >>> inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    >>> out, _ = perturb_tokens(inputs, "token_dropout", 5, torch.Generator().manual_seed(1), vocab)
    >>> out["input_ids"].tolist(), out["attention_mask"].tolist()
    ([[2, 9, 3, 0, 0, 0]], [[1, 1, 1, 0, 0, 0]])
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_trust.core.calls import PositionalInputs

__all__ = ["IGNORE_INDEX", "TEXT_CORRUPTIONS", "Vocabulary", "find_vocabulary", "perturb_tokens", "token_ids"]

#: The text suite, by name.
TEXT_CORRUPTIONS: tuple[str, ...] = ("token_dropout", "word_swap", "char_noise")
#: Probability that a word token (or word, for ``char_noise``) is perturbed, severity 1..5.
_RATES = (0.05, 0.1, 0.2, 0.3, 0.5)
#: The target value of a token that carries no label (Hugging Face's and PyTorch's ``ignore_index``).
IGNORE_INDEX = -100
_SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")


@dataclass(frozen=True)
class Vocabulary:
    """What the text perturbations know of the vocabulary: how many ids, padding, the special ids
    and, for ``char_noise``, a tokenizer with ``encode``/``decode``."""

    size: int
    pad_token_id: Optional[int]
    special_ids: frozenset[int]
    tokenizer: Any = None


def find_vocabulary(module: Any, datamodule: Any = None, tokenizer: Any = None) -> Optional[Vocabulary]:
    """The vocabulary from ``tokenizer`` (or ``datamodule.tokenizer``), the model's input embeddings
    (``get_input_embeddings()``) and configs; ``None`` when no vocabulary size can be found."""
    tokenizer = tokenizer if tokenizer is not None else getattr(datamodule, "tokenizer", None)
    size: Optional[int] = None
    if tokenizer is not None:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    sources = [s for s in (tokenizer, datamodule) if s is not None]
    for sub in module.modules() if hasattr(module, "modules") else ():
        config = getattr(sub, "config", None)
        if config is not None:
            sources.append(config)
        getter = getattr(sub, "get_input_embeddings", None)
        if size is None and callable(getter):
            embedding = getter()
            size = getattr(embedding, "num_embeddings", None)
    if size is None:
        size = next((int(v) for s in sources if isinstance(v := getattr(s, "vocab_size", None), int)), None)
    if size is None:
        return None
    specials: set[int] = set()
    for source in sources:
        specials.update(int(i) for i in getattr(source, "all_special_ids", None) or () if isinstance(i, int))
        for name in _SPECIAL_NAMES:
            value = getattr(source, f"{name}_token_id", None)
            if isinstance(value, int) and not isinstance(value, bool):
                specials.add(value)
    pad = next((v for s in sources if isinstance(v := getattr(s, "pad_token_id", None), int)), None)
    return Vocabulary(int(size), pad, frozenset(specials), tokenizer)


def token_ids(inputs: Any) -> Optional[Tensor]:
    """The integer token ids among a batch's inputs (``input_ids`` of a dict, the tensor itself, the
    first of positional inputs), or ``None`` for non-token inputs."""
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


def _replace_ids(inputs: Any, new: dict[str, Tensor]) -> Any:
    """``inputs`` with the token ids (and the dict's other per-token tensors) replaced."""
    if isinstance(inputs, PositionalInputs):
        return PositionalInputs((_replace_ids(inputs[0], new), *inputs[1:]))
    if isinstance(inputs, Mapping):
        return {**inputs, **new}
    return new["input_ids"]


def perturb_tokens(
    inputs: Any, name: str, severity: int, generator: torch.Generator, vocab: Vocabulary, target: Any = None
) -> tuple[Any, Any]:
    """``(inputs, target)`` with text perturbation ``name`` at ``severity`` (1..5). A per-token
    ``target`` (the ids' shape) moves with ``token_dropout``; any other target is returned as is."""
    ids = token_ids(inputs)
    if ids is None:
        raise ValueError("Text corruptions need integer token ids (N, L): `input_ids` or an integer tensor.")
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    real = mask.bool() if isinstance(mask, Tensor) else _not_pad(ids, vocab)
    specials = torch.tensor(sorted(vocab.special_ids), dtype=ids.dtype, device=ids.device)
    words = real & ~torch.isin(ids, specials)
    rate = _RATES[severity - 1]
    if name == "char_noise":
        new_ids, new_mask = _char_noise(ids, real, rate, generator, vocab)
        return _replace_ids(inputs, _with_mask({"input_ids": new_ids}, inputs, new_mask)), target
    hit = (torch.rand(ids.shape, generator=generator, device=ids.device) < rate) & words
    if name == "word_swap":
        allowed = torch.tensor(
            [i for i in range(vocab.size) if i not in vocab.special_ids], dtype=ids.dtype, device=ids.device
        )
        pick = torch.randint(len(allowed), ids.shape, generator=generator, device=ids.device)
        return _replace_ids(inputs, {"input_ids": torch.where(hit, allowed[pick], ids)}), target
    if name != "token_dropout":
        raise ValueError(f"Unknown text corruption {name!r}; the text suite has: {', '.join(TEXT_CORRUPTIONS)}.")
    keep = ~hit
    # kept positions first, in order; dropped ones go to the end and become padding
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    kept_count = keep.sum(dim=1, keepdim=True)
    tail = torch.arange(ids.shape[1], device=ids.device).expand_as(ids) >= kept_count
    pad = vocab.pad_token_id if vocab.pad_token_id is not None else 0
    new: dict[str, Tensor] = {"input_ids": ids.gather(1, order).masked_fill(tail, pad)}
    if isinstance(inputs, Mapping):
        for key, value in inputs.items():
            if key != "input_ids" and isinstance(value, Tensor) and value.shape == ids.shape:
                new[key] = value.gather(1, order).masked_fill(tail, 0)
    if isinstance(target, Tensor) and target.shape == ids.shape:
        target = target.gather(1, order).masked_fill(tail, IGNORE_INDEX)
    return _replace_ids(inputs, new), target


def _not_pad(ids: Tensor, vocab: Vocabulary) -> Tensor:
    return ids != vocab.pad_token_id if vocab.pad_token_id is not None else torch.ones_like(ids, dtype=torch.bool)


def _with_mask(new: dict[str, Tensor], inputs: Any, mask: Tensor) -> dict[str, Tensor]:
    if isinstance(inputs, Mapping):
        old = inputs.get("attention_mask")
        if isinstance(old, Tensor):
            new["attention_mask"] = mask.to(old.dtype)
        types = inputs.get("token_type_ids")
        if isinstance(types, Tensor):  # single-segment texts: keep segment 0
            new["token_type_ids"] = torch.zeros_like(types)
    return new


def _char_noise(
    ids: Tensor, real: Tensor, rate: float, generator: torch.Generator, vocab: Vocabulary
) -> tuple[Tensor, Tensor]:
    tokenizer = vocab.tokenizer
    if (
        tokenizer is None
        or not callable(getattr(tokenizer, "encode", None))
        or not callable(getattr(tokenizer, "decode", None))
    ):
        raise ValueError("`char_noise` needs a tokenizer with `encode` and `decode`: pass `tokenizer=`.")
    seed = int(torch.randint(2**62, (1,), generator=generator, device=ids.device).item())
    rng = random.Random(seed)
    length = ids.shape[1]
    pad = vocab.pad_token_id if vocab.pad_token_id is not None else 0
    rows, masks = [], []
    for row, row_real in zip(ids.tolist(), real.tolist()):
        tokens = [t for t, r in zip(row, row_real) if r]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        noisy = " ".join(_edit(w, rng) if rng.random() < rate else w for w in text.split(" "))
        encoded = [int(t) for t in tokenizer.encode(noisy)]
        while encoded and encoded[-1] == pad:
            encoded.pop()  # a tokenizer that pads to its own length
        if len(encoded) > length:
            encoded = encoded[: length - 1] + encoded[-1:]  # keep the closing special token
        rows.append(encoded + [pad] * (length - len(encoded)))
        masks.append([1] * len(encoded) + [0] * (length - len(encoded)))
    return (
        torch.tensor(rows, dtype=ids.dtype, device=ids.device),
        torch.tensor(masks, dtype=torch.long, device=ids.device),
    )


def _edit(word: str, rng: random.Random) -> str:
    """One character edit of ``word``: swap two neighbours, delete, insert or substitute a letter."""
    if not word:
        return word
    i = rng.randrange(len(word))
    kind = rng.randrange(4) if len(word) > 1 else rng.choice((2, 3))
    letter = rng.choice(string.ascii_lowercase)
    if kind == 0:
        j = min(i + 1, len(word) - 1) if i < len(word) - 1 else i - 1
        a, b = sorted((i, j))
        return word[:a] + word[b] + word[a] + word[b + 1 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    if kind == 2:
        return word[:i] + letter + word[i:]
    return word[:i] + letter + word[i + 1 :]
