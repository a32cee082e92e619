"""The model inputs of an attribution: the attributed tensor, the other inputs Captum passes on as
``additional_forward_args``, and the parts of the model they meet (input embeddings, config).

A batch's inputs come through the batch contract: a tensor, a dict of model keyword arguments
(Hugging Face batches) or a tuple of positional inputs. One of them is attributed (``input_ids``
for token models, ``pixel_values`` for vision models, or the one named by ``input``); the others
(``attention_mask``, ``token_type_ids``...) are passed unchanged to every forward Captum makes.

Example:
    >>> import torch
    >>> inputs = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    >>> key, main, others = split_inputs(inputs)
    >>> key, main.shape, list(others)
    ('input_ids', torch.Size([2, 4]), ['attention_mask'])
    >>> embedding_layer(torch.nn.Sequential(torch.nn.Embedding(10, 3), torch.nn.Flatten()))[0]
    '0'
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Optional, Union

from torch import Tensor, nn

from lightning_trust.core.calls import logits_of

__all__ = [
    "ATTRIBUTED_KEYS",
    "InputsForward",
    "embedding_layer",
    "find_config_value",
    "find_hf_model",
    "module_path",
    "resolve_layer",
    "split_inputs",
]

#: Keyword inputs attributed by default, in this order (the first the batch has).
ATTRIBUTED_KEYS: tuple[str, ...] = ("input_ids", "pixel_values", "inputs_embeds", "input_values", "input_features")

Key = Union[str, int, None]


def split_inputs(inputs: Any, choose: Optional[str] = None) -> tuple[Key, Tensor, dict[Any, Tensor]]:
    """``(key, attributed tensor, {name or position: other input})`` of one batch's inputs.

    ``key`` is ``None`` for a single tensor, the keyword of a dict of keyword inputs, or the
    position ``0`` of positional inputs (a tuple: the first is attributed). ``choose`` names the
    attributed keyword (default: the first of :data:`ATTRIBUTED_KEYS`, else the first tensor).
    Values that are not tensors are left out.
    """
    if isinstance(inputs, Tensor):
        if choose is not None:
            raise ValueError(
                f"`input={choose!r}` names a keyword input, but the batches' inputs are a single tensor; "
                "remove `input` (the tensor is attributed)."
            )
        return None, inputs, {}
    if isinstance(inputs, Mapping):
        tensors = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
        if choose is not None and choose not in tensors:
            raise ValueError(
                f"`input={choose!r}` is not one of the model's inputs in the batches ({sorted(tensors)}); "
                f"set `input` to one of them."
            )
        key = choose or next((k for k in ATTRIBUTED_KEYS if k in tensors), next(iter(tensors), None))
        if key is None:
            raise ValueError(f"The batches' inputs hold no tensor (keys {list(inputs)}); nothing can be attributed.")
        return key, tensors[key], {k: v for k, v in tensors.items() if k != key}
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(v, Tensor) for v in inputs):
        return 0, inputs[0], {i: v for i, v in enumerate(inputs) if i > 0}
    raise TypeError(
        f"Attribution needs tensor inputs, a dict of keyword inputs or a tuple of tensors, got "
        f"{type(inputs).__name__}; point `batch_keys: {{input: <key>}}` at the model's input tensor."
    )


class InputsForward(nn.Module):
    """``module`` called on the attributed input and the others (``forward(main, *others)``) the way
    its ``forward`` takes them, returning its scores: what Captum calls, with ``others`` passed as
    ``additional_forward_args``. The user's module is a submodule (under ``module.``)."""

    def __init__(self, module: nn.Module, key: Key = None, names: tuple[Any, ...] = ()) -> None:
        super().__init__()
        self.module = module
        self.key = key
        self.names = tuple(names)

    def forward(self, main: Tensor, *others: Tensor) -> Tensor:
        if self.key is None:
            return logits_of(self.module(main))
        if isinstance(self.key, int):
            args = {self.key: main, **dict(zip(self.names, others))}
            return logits_of(self.module(*(args[i] for i in sorted(args))))
        return logits_of(self.module(**{self.key: main, **dict(zip(self.names, others))}))


def find_hf_model(module: nn.Module) -> Optional[Any]:
    """The first module in ``module``'s tree (itself included) with a working ``get_input_embeddings``
    (a Hugging Face model, or a PEFT wrap of one)."""
    for candidate in module.modules():
        getter = getattr(candidate, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(found, nn.Module):
            return candidate
    return None


def module_path(root: nn.Module, target: nn.Module) -> Optional[str]:
    """The dotted path of ``target`` in ``root`` (``""`` for ``root`` itself), or ``None``."""
    return next((name for name, m in root.named_modules(remove_duplicate=False) if m is target), None)


def embedding_layer(module: nn.Module) -> tuple[str, nn.Module]:
    """``(path, layer)`` of the input embeddings: ``get_input_embeddings()`` of the Hugging Face
    model inside ``module``, else its only ``nn.Embedding``; raises naming the fix otherwise."""
    hf = find_hf_model(module)
    if hf is not None:
        layer = hf.get_input_embeddings()
        path = module_path(module, layer)
        if path is not None:
            return path, layer
    embeddings = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) == 1:
        return embeddings[0]
    raise ValueError(
        f"Attribution cannot find the input embeddings of {type(module).__name__} (no `get_input_embeddings()` and "
        f"{len(embeddings)} nn.Embedding modules: {[n for n, _ in embeddings][:10]}); set `layer` to the dotted path "
        "of the embedding layer."
    )


def find_config_value(module: nn.Module, name: str) -> Any:
    """``config.<name>`` of the first module in the tree with a config holding it (``None`` if none)."""
    for candidate in module.modules():
        value = getattr(getattr(candidate, "config", None), name, None)
        if value is not None:
            return value
    return None


def resolve_layer(module: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` (``"features.3"``); an unknown path fails naming the
    closest module paths."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f"did you mean {close}?" if close else f"some of its modules: {names[:20]}."
        raise ValueError(
            f"`layer={path!r}` is not a submodule of {type(module).__name__}; {hint} Set `layer` to a dotted path "
            "from the LightningModule."
        ) from None
