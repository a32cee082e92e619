"""How QuantizationAwareTraining calls the fake-quantized graph: the module's own call signature
in one canonical form, the forward that routes it, and where a traced call's arguments sit in a batch.

Why not ``module.forward = graph.forward``: that binds the graph's *first* compiled code, and every
later ``recompile()`` (train/eval switches, BatchNorm freezing) builds a new ``forward`` the module
never calls, so validation kept running with dropout and batch statistics. :class:`GraphForward`
calls the graph itself on each call, so it always runs its current code.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x, mask=None, scale=2.0):
    ...         return x * scale
    >>> call = ForwardCall.bind(Net(), (torch.ones(2, 3),), {"scale": 3.0})  # mask left out: scale by name
    >>> call.names(), call.invoke(Net()).sum().item()
    (['x', 'scale'], 18.0)
    >>> ForwardCall.bind(Net(), (), {"x": torch.ones(1), "mask": torch.ones(1)}).names()  # by keyword: the same call
    ['x', 'mask']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_trust.compression.qat_graph import sync_graph_mode
from lightning_trust.core.calls import PositionalInputs
from lightning_trust.core.tensors import iter_tensors, map_tensors

__all__ = ["CallTemplate", "ForwardCall", "GraphForward"]


@dataclass
class ForwardCall:
    """A call of a module's ``forward`` in one canonical form: the leading positional parameters
    positionally (``module(x)``, ``module(input_ids, attention_mask)``), arguments after one left
    at its default, and keyword-only ones, by name; arguments at their default dropped. The
    exported graph (and the int8 program) takes exactly this form."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    arg_names: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def bind(cls, module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ForwardCall:
        """The canonical form of ``module(*args, **kwargs)`` (raises ``TypeError`` as the call would)."""
        signature = inspect.signature(type(module).forward)
        bound = signature.bind(module, *args, **kwargs)
        positional: list[Any] = []
        names: list[str] = []
        named: dict[str, Any] = {}
        gap = False  # a positional parameter left at its default: the later ones go by name
        for param in list(signature.parameters.values())[1:]:  # the first is self
            present = param.name in bound.arguments
            value = bound.arguments.get(param.name, param.default)
            if param.kind is param.VAR_POSITIONAL:
                positional.extend(value if present else ())
                names.extend(f"*{param.name}" for _ in (value if present else ()))
            elif param.kind is param.VAR_KEYWORD:
                named.update(value if present else {})
            elif not present or value is param.default:
                gap = True
            elif param.kind is param.KEYWORD_ONLY or (gap and param.kind is param.POSITIONAL_OR_KEYWORD):
                named[param.name] = value
            else:
                positional.append(value)
                names.append(param.name)
        return cls(tuple(positional), named, tuple(names))

    @classmethod
    def from_inputs(cls, module: Any, inputs: Any) -> ForwardCall:
        """The call a batch's inputs make (a tensor, keyword inputs, :class:`PositionalInputs`)."""
        if isinstance(inputs, ForwardCall):
            return inputs
        if isinstance(inputs, PositionalInputs):
            return cls.bind(module, tuple(inputs), {})
        if isinstance(inputs, Mapping):
            return cls.bind(module, (), dict(inputs))
        return cls.bind(module, (inputs,), {})

    def to_state(self) -> dict[str, Any]:
        """Plain containers (a checkpoint loads them with ``weights_only=True``)."""
        return {"args": list(self.args), "kwargs": dict(self.kwargs), "arg_names": list(self.arg_names)}

    @classmethod
    def from_state(cls, module: Any, state: Any) -> ForwardCall:
        """A call saved by :meth:`to_state` (or an older checkpoint's example tensor)."""
        if isinstance(state, Mapping) and {"args", "kwargs"} <= set(state):
            return cls(tuple(state["args"]), dict(state["kwargs"]), tuple(state.get("arg_names", ())))
        return cls.from_inputs(module, state)

    def batch_size(self) -> Optional[int]:
        """The leading size of the first tensor with a dimension (``None`` without one)."""
        first = next((t for t in iter_tensors((self.args, self.kwargs)) if t.ndim > 0), None)
        return int(first.shape[0]) if first is not None else None

    def rows(self, count: int) -> ForwardCall:
        """The first ``count`` rows of every batch-sized tensor, detached CPU copies (an example to keep)."""
        size = self.batch_size()

        def cut(t: Tensor) -> Tensor:
            t = t[:count] if size is not None and t.ndim > 0 and t.shape[0] == size else t
            return t.detach().cpu().clone()

        return self.map(cut)

    def names(self) -> list[str]:
        positional = list(self.arg_names) if len(self.arg_names) == len(self.args) else []
        return positional + [f"<positional {i}>" for i in range(len(positional), len(self.args))] + list(self.kwargs)

    def map(self, fn: Callable[[Tensor], Any]) -> ForwardCall:
        args = tuple(map_tensors(a, fn) for a in self.args)
        return ForwardCall(args, map_tensors(self.kwargs, fn), self.arg_names)

    def invoke(self, module: Callable[..., Any]) -> Any:
        return module(*self.args, **self.kwargs)

    def structure(self) -> tuple[Any, ...]:
        """What the exported graph fixes: argument names, which are tensors, and non-tensor values."""

        def leaf(value: Any) -> Any:
            return "tensor" if isinstance(value, Tensor) else map_tensors(value, lambda t: "tensor")

        return (tuple(leaf(a) for a in self.args), tuple((k, leaf(v)) for k, v in self.kwargs.items()))


class GraphForward:
    """The LightningModule's forward while QAT runs: binds the module's own signature, then calls
    the fake-quantized graph (its current code, after any recompile)."""

    def __init__(self, module: nn.Module, graph: torch.fx.GraphModule, exported: ForwardCall) -> None:
        self.module_class = type(module).__name__
        self.module = module
        self.graph = graph
        self.structure = exported.structure()
        self.exported_names = exported.names()
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = ForwardCall.bind(self.module, args, kwargs)
        self.calls += 1
        if call.structure() != self.structure:
            raise TypeError(
                f"QuantizationAwareTraining traced {self.module_class}.forward called with {self.exported_names}; "
                f"this call passes {call.names()} (or other non-tensor values). Call the module the way "
                "training_step calls it, or pass `example_input` with the arguments every call uses."
            )
        sync_graph_mode(self.graph)  # a deep copy of the module lost the graph's train/eval switch
        return call.invoke(self.graph)


@dataclass
class CallTemplate:
    """Where each argument of the traced call came from in its batch (a key or a position), so
    the same call can be built from any batch of the loaders (validation, latency)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    arg_names: tuple[str, ...] = ()

    @classmethod
    def match(cls, call: ForwardCall, batch: Any) -> Optional[CallTemplate]:
        """The template of ``call`` in ``batch`` (its tensors are the batch's own), or ``None``."""
        if isinstance(batch, Mapping):
            entries = list(batch.items())
        elif isinstance(batch, (tuple, list)):
            entries = list(enumerate(batch))
        else:
            entries = [(None, batch)]

        def source(value: Any) -> Any:
            if not isinstance(value, Tensor):
                return ("value", value)
            key = next((k for k, v in entries if v is value), _MISSING)
            return _MISSING if key is _MISSING else ("batch", key)

        args = tuple(source(a) for a in call.args)
        kwargs = {k: source(v) for k, v in call.kwargs.items()}
        if any(s is _MISSING for s in (*args, *kwargs.values())):
            return None
        return cls(args, kwargs, call.arg_names)

    def call(self, batch: Any) -> ForwardCall:
        def value(source: Any) -> Any:
            kind, key = source
            if kind == "value":
                return key
            return batch if key is None else batch[key]

        args = tuple(value(s) for s in self.args)
        return ForwardCall(args, {k: value(s) for k, s in self.kwargs.items()}, self.arg_names)

    def to_state(self) -> dict[str, Any]:
        return {"args": list(self.args), "kwargs": dict(self.kwargs), "arg_names": list(self.arg_names)}

    @classmethod
    def from_state(cls, state: Optional[Mapping[str, Any]]) -> Optional[CallTemplate]:
        if not state:
            return None
        args = tuple(tuple(s) for s in state["args"])
        return cls(args, {k: tuple(s) for k, s in state["kwargs"].items()}, tuple(state.get("arg_names", ())))


_MISSING = object()
