"""Calling a user's module on a batch's inputs and reading its scores from whatever it returns.

Part of the batch contract (:mod:`lightning_trust.core.batch` re-exports every name here).

Example:
    >>> import torch
    >>> from transformers.modeling_outputs import SequenceClassifierOutput
    >>> logits_of(SequenceClassifierOutput(loss=torch.tensor(0.3), logits=torch.ones(2, 3))).shape
    torch.Size([2, 3])
    >>> call_module(torch.nn.Linear(3, 2), torch.ones(4, 3)).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_trust.core.passes import saved_modes
from lightning_trust.core.tensors import first_tensor

__all__ = [
    "PREDICTION_KEYS",
    "PositionalInputs",
    "ScoresModule",
    "call_module",
    "forward_no_grad",
    "forward_parameters",
    "logits_of",
    "logits_or_none",
    "predictions_from_outputs",
    "required_positional",
]

#: Keys in a step's returned dict (or attributes of a ``ModelOutput``) taken as predictions, in this order.
PREDICTION_KEYS: tuple[str, ...] = ("logits", "preds", "y_hat", "probs", "scores", "output", "outputs")


def forward_parameters(module: Any) -> Optional[frozenset[str]]:
    """The keyword names ``module.forward`` (or a plain callable) accepts, or ``None`` when it
    takes ``**kwargs``."""
    try:
        signature = inspect.signature(getattr(module, "forward", module))
    except (TypeError, ValueError):
        return None
    names: set[str] = set()
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(param.name)
    return frozenset(names)


def required_positional(module: Any) -> int:
    """How many positional arguments ``module.forward`` requires (those without a default; 1 when
    the signature cannot be read or takes ``*args``)."""
    try:
        signature = inspect.signature(getattr(module, "forward", module))
    except (TypeError, ValueError):
        return 1
    required = 0
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return max(required, 1)
        positional = param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if positional and param.default is inspect.Parameter.empty:
            required += 1
    return max(required, 1)


class PositionalInputs(tuple):  # a tuple of whatever the batch holds
    """The inputs of a module whose ``forward`` takes several positional tensors (Lightning's
    ``LightningTransformer.forward(inputs, target)``): the first elements of a tuple batch, which
    :func:`call_module` passes as ``module(*inputs)``. The first is the one explanations attribute;
    the others are additional forward arguments.

    Example:
        >>> class TwoInputs(nn.Module):
        ...     def forward(self, a, b):
        ...         return a + b
        >>> call_module(TwoInputs(), PositionalInputs((torch.ones(2), torch.ones(2)))).tolist()
        [2.0, 2.0]
    """

    __slots__ = ()


def call_module(module: Any, inputs: Any) -> Any:
    """Call a module on a batch's inputs: ``module(**inputs)`` for keyword inputs (a dict whose
    keys the forward accepts by name, or a forward taking ``**kwargs``), ``module(*inputs)`` for
    :class:`PositionalInputs`, ``module(inputs)`` otherwise (a tensor, or one dict the forward
    takes as a single argument)."""
    if isinstance(inputs, PositionalInputs):
        return module(*inputs)
    if isinstance(inputs, Mapping):
        accepted = forward_parameters(module)
        if accepted is None or set(inputs) <= accepted:
            return module(**inputs)
    return module(inputs)


def logits_of(output: Any) -> Tensor:
    """The scores in any model output: a tensor, a Hugging Face ``ModelOutput`` (``.logits``), a
    dict with one of :data:`PREDICTION_KEYS`, or a tuple/list (its first tensor with a batch
    dimension)."""
    found = logits_or_none(output)
    if found is None:
        raise TypeError(
            f"Cannot find predictions in the model's output ({type(output).__name__}): expected a tensor, an object with "
            f"`.logits`, a dict with one of {list(PREDICTION_KEYS)} or a tuple of tensors. Return the logits from "
            "`forward`."
        )
    return found


def logits_or_none(output: Any) -> Optional[Tensor]:
    """Like :func:`logits_of`, but ``None`` when the output holds no scores."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        for key in PREDICTION_KEYS:
            if isinstance(output.get(key), Tensor):
                return output[key]
        return None
    if isinstance(output, (list, tuple)):
        return first_tensor(output, min_ndim=1)
    return None


def predictions_from_outputs(outputs: Any, batch_size: Optional[int] = None) -> Optional[Tensor]:
    """The predictions held by a step's return value, or ``None`` when it holds none."""
    candidate: Any = None
    if isinstance(outputs, Tensor):
        candidate = outputs
    elif isinstance(getattr(outputs, "logits", None), Tensor):
        candidate = outputs.logits
    elif isinstance(outputs, Mapping):
        for key in PREDICTION_KEYS:
            if key in outputs:
                candidate = outputs[key]
                break
        if candidate is not None and not isinstance(candidate, Tensor):
            candidate = logits_or_none(candidate)
    if not isinstance(candidate, Tensor) or candidate.ndim == 0:
        return None  # a scalar is a loss, not predictions
    if batch_size is not None and candidate.shape[0] != batch_size:
        return None
    return candidate.detach()


def forward_no_grad(module: nn.Module, inputs: Any) -> Tensor:
    """The logits of ``module`` on ``inputs`` under ``torch.no_grad()`` in eval mode, restoring each
    submodule's mode."""
    with saved_modes(module, training=False), torch.no_grad():
        return logits_of(call_module(module, inputs))


class ScoresModule(nn.Module):
    """``module`` returning only its scores (:func:`logits_of` of its output): for libraries that
    need a module whose forward returns a tensor (Captum's explainers, attacks) when the user's
    returns a ``ModelOutput``, a dict or a tuple. Its submodules are the user's, under ``module.``.

    Example:
        >>> from transformers.modeling_outputs import SequenceClassifierOutput
        >>> class HFLike(nn.Module):
        ...     def forward(self, input_ids):
        ...         return SequenceClassifierOutput(logits=input_ids.float())
        >>> ScoresModule(HFLike())(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return logits_of(self.module(*args, **kwargs))

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        """The user's module inside a :class:`ScoresModule` (or ``module`` itself)."""
        return module.module if isinstance(module, ScoresModule) else module
