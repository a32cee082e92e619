"""What :class:`~lightning_trust.evaluation.CrossDomainEvaluation` checks at setup, on one sample of
the data it will evaluate: the module has a ``validation_step``, the batches have a target and the
domain column, and the corruptions fit the inputs (image corruptions need images, the text suite
needs token ids and, for ``char_noise``, a tokenizer). Every refusal names the fix.

Example:
    >>> import torch
    >>> input_kind(torch.rand(4, 1, 8, 8)), input_kind({"input_ids": torch.ones(2, 5, dtype=torch.long)})
    ('image', 'tokens')
    >>> input_kind(torch.rand(4, 14))
    'other'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_trust.core.batch import BatchContract, BatchKeyError, describe_keys
from lightning_trust.core.calls import PositionalInputs
from lightning_trust.core.loaders import split_loaders
from lightning_trust.core.passes import fork_rngs
from lightning_trust.evaluation.corruptions import CORRUPTIONS
from lightning_trust.evaluation.text import TEXT_CORRUPTIONS, Vocabulary, find_vocabulary, token_ids
from lightning_trust.evaluation.tokens import label_shift

__all__ = ["Probed", "check_setup", "input_kind", "probe_batch"]

_TEXT_FIX = "`corruptions: [token_dropout, word_swap, char_noise]` (the text suite)"


@dataclass
class Probed:
    """What setup found: the corruptions for these inputs, the vocabulary (token inputs) and the
    label shift of token-level targets."""

    corruptions: list[str]
    vocabulary: Optional[Vocabulary]
    shift: Optional[int]


def input_kind(inputs: Any) -> str:
    """``"image"`` (float ``(N, C, H, W)``/``(N, H, W)``, or a dict's ``pixel_values``), ``"tokens"``
    (integer ids ``(N, L)``) or ``"other"``."""
    if token_ids(inputs) is not None:
        return "tokens"
    if isinstance(inputs, PositionalInputs):
        inputs = inputs[0]
    if isinstance(inputs, Mapping):
        inputs = inputs.get("pixel_values")
    if isinstance(inputs, Tensor) and inputs.is_floating_point() and inputs.ndim in (3, 4):
        return "image"
    return "other"


def probe_batch(trainer: Any, split: str) -> Any:
    """A batch of the first one or two samples of the split's first loader (collated like the
    loader), or ``None`` when there is no loader to read."""
    loaders = split_loaders(trainer, split)
    if not loaders:
        return None
    loader = loaders[0]
    dataset = loader.dataset
    with fork_rngs(devices=[]):  # iterating a loader draws from the global RNG
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or loader.batch_size is None:
            return next(iter(loader), None)
        n = len(dataset)
        return loader.collate_fn([dataset[i] for i in range(min(n, 2))]) if n else None


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"a {str(inputs.dtype).replace('torch.', '')} tensor of shape {tuple(inputs.shape)}"
    return describe_keys(inputs)


def check_setup(
    trainer: Any,
    pl_module: Any,
    stage: str,
    contract: BatchContract,
    *,
    domain_key: Optional[str],
    corruptions: Union[str, Sequence[str], None],
    resolved: Sequence[str],
    tokenizer: Any,
    shift_setting: Union[str, int],
) -> Probed:
    """Refuse what cannot be evaluated, before any training step; return what the run uses."""
    if stage == "fit" and not is_overridden("validation_step", pl_module):
        raise ValueError(
            f"CrossDomainEvaluation evaluates in the validation loop, but {type(pl_module).__name__} has no "
            "`validation_step`, so Lightning runs no validation: add a `validation_step` (it may return nothing: "
            "the evaluation reads the module's own forward), or add a `test_step` and run `trainer.test`."
        )
    batch = probe_batch(trainer, "test" if stage == "test" else "val")
    if batch is None:
        return Probed(list(resolved), None, None)
    if not contract.has_target(batch):
        raise BatchKeyError(
            f"CrossDomainEvaluation scores predictions against a target, but the batches hold none "
            f"({describe_keys(batch)}): yield (inputs, target, ...) tuples or dicts with a target, and set "
            "`batch_keys: {target: <key or position>}` where it is not under a default name."
        )
    if domain_key is not None and not contract.has_side(batch, domain_key):
        try:
            contract.side(batch, domain_key)
        except BatchKeyError as err:
            raise BatchKeyError(f"CrossDomainEvaluation(domain_key={domain_key!r}): {err}") from None
    inputs, target = contract.inputs(batch), contract.target(batch)
    shift = label_shift(shift_setting, inputs, target)
    if not resolved:
        return Probed([], None, shift)
    kind = input_kind(inputs)
    names = list(resolved)
    if kind == "tokens":
        vocabulary = find_vocabulary(pl_module, getattr(trainer, "datamodule", None), tokenizer)
        if corruptions == "all":  # the text suite; char_noise where a tokenizer can re-encode sequence targets
            per_token = isinstance(target, Tensor) and target.shape == getattr(token_ids(inputs), "shape", None)
            names = [c for c in TEXT_CORRUPTIONS if c != "char_noise" or (_has_codec(vocabulary) and not per_token)]
        _check_text(names, inputs, target, vocabulary)
        return Probed(names, vocabulary, shift)
    text = [c for c in names if c in TEXT_CORRUPTIONS]
    if text:
        raise ValueError(
            f"Text corruptions {text} need integer token ids (`input_ids`), but the inputs are {_describe(inputs)}: "
            f"use image corruptions ({', '.join(CORRUPTIONS)}) for images, or remove `corruptions`."
        )
    if kind != "image":
        raise ValueError(
            f"Image corruptions {names} need float images (N, C, H, W) or a dict's `pixel_values`, but the inputs "
            f"are {_describe(inputs)}: remove `corruptions` (evaluate shifted data with `domains` instead)."
        )
    return Probed(names, None, shift)


def _has_codec(vocabulary: Optional[Vocabulary]) -> bool:
    tokenizer = vocabulary.tokenizer if vocabulary is not None else None
    return callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))


def _check_text(names: Sequence[str], inputs: Any, target: Any, vocabulary: Optional[Vocabulary]) -> None:
    image = [c for c in names if c in CORRUPTIONS]
    if image:
        raise ValueError(
            f"Image corruptions {image} need float images, but the inputs are token ids ({_describe(inputs)}): use "
            f"{_TEXT_FIX}."
        )
    if vocabulary is None:
        raise ValueError(
            "The text corruptions need the vocabulary size, and neither a tokenizer nor the model's "
            "`get_input_embeddings()` gives one: pass `tokenizer=` (with `__len__` and the special token ids)."
        )
    ids = token_ids(inputs)
    has_mask = isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor)
    if "token_dropout" in names and vocabulary.pad_token_id is None and not has_mask:
        raise ValueError(
            "`token_dropout` pads the shortened texts, but no pad id is known and the inputs have no "
            "`attention_mask`: pass `tokenizer=` with a `pad_token_id` (or set the model config's `pad_token_id`)."
        )
    if "char_noise" in names:
        if not _has_codec(vocabulary):
            raise ValueError(
                "`char_noise` edits the characters of words, which needs a tokenizer with `encode`/`decode`: pass "
                "`tokenizer=` (e.g. `datamodule.tokenizer`), or use `corruptions: [token_dropout, word_swap]`."
            )
        if isinstance(target, Tensor) and ids is not None and target.shape == ids.shape:
            raise ValueError(
                "`char_noise` re-tokenizes the text, so per-token targets no longer line up with it: use "
                "`corruptions: [token_dropout, word_swap]` for token-level (language model) targets."
            )
