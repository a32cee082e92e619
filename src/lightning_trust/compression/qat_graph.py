"""The fake-quantized graph as the LightningModule's forward: the module's own call signature,
and train/eval modes that really switch.

Why not ``module.forward = graph.forward``: that binds the graph's *first* compiled code, and every
later ``recompile()`` (train/eval switches, BatchNorm freezing) builds a new ``forward`` the module
never calls, so validation kept running with dropout and batch statistics. :class:`GraphForward`
calls the graph itself on each call, so it always runs its current code.

Why not torchao's ``move_exported_model_to_eval``: its pattern rewrite replaces every dropout and
BatchNorm with its own literals (p=0.5, momentum=0.1, eps=1e-5, so a ``BatchNorm2d(eps=1e-3)`` or a
``Dropout(0.1)`` changes when the mode switches), and it leaves attention dropout
(``scaled_dot_product_attention(dropout_p=...)``) and the ``num_batches_tracked`` increment in
eval mode. :func:`set_graph_mode` flips only the mode arguments of those nodes, in place.

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
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_trust.core.calls import PositionalInputs
from lightning_trust.core.tensors import iter_tensors, map_tensors

__all__ = [
    "CallTemplate",
    "ForwardCall",
    "GraphForward",
    "freeze_graph_batchnorm",
    "freeze_graph_observers",
    "install_modes",
    "restore_batchnorm_literals",
    "set_graph_mode",
    "training_ops",
]

_ATEN = torch.ops.aten
#: dropout ops and the index of their ``train`` argument
_DROPOUT_OPS = {
    _ATEN.dropout.default: 2, _ATEN.feature_dropout.default: 2, _ATEN.alpha_dropout.default: 2,
    _ATEN.feature_alpha_dropout.default: 2, _ATEN.native_dropout.default: 2,
}  # fmt: skip
#: batch-norm ops and the index of their ``training`` argument
_BN_OPS = {_ATEN.batch_norm.default: 5, _ATEN._native_batch_norm_legit.default: 5, _ATEN.cudnn_batch_norm.default: 5}
_SDPA = _ATEN.scaled_dot_product_attention.default
_SDPA_DROPOUT = 4  # position of dropout_p
_TRAIN_VALUE = "lightning_trust_train_value"  # node meta: the value the node had in training mode
#: graph attributes: the modes QuantizationAwareTraining has frozen
BN_FROZEN, OBSERVERS_FROZEN = "lightning_trust_bn_frozen", "lightning_trust_observers_frozen"


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
        return call.invoke(self.graph)


def _set_arg(node: torch.fx.Node, index: int, name: str, value: Any) -> bool:
    """Set a node's argument (positional at ``index`` or keyword ``name``); True when it changed."""
    if name in node.kwargs:
        if node.kwargs[name] == value:
            return False
        node.kwargs = {**node.kwargs, name: value}
        return True
    if len(node.args) > index:
        if node.args[index] == value:
            return False
        node.args = (*node.args[:index], value, *node.args[index + 1 :])
        return True
    node.kwargs = {**node.kwargs, name: value}
    return True


def _arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _is_batch_counter(node: torch.fx.Node) -> bool:
    """``num_batches_tracked += 1`` of a BatchNorm (a buffer update, only meaningful in training)."""
    if node.op != "call_function" or node.target is not _ATEN.add_.Tensor:
        return False
    target = node.args[0]
    return isinstance(target, torch.fx.Node) and str(target.target).endswith("num_batches_tracked")


def set_graph_mode(graph: torch.fx.GraphModule, training: bool, bn_training: Optional[bool] = None) -> bool:
    """Switch an exported graph's dropout, attention dropout, BatchNorm and its batch counter to
    ``training`` (BatchNorm to ``bn_training``, default ``training``); True when a node changed."""
    bn_training = training if bn_training is None else bn_training
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _DROPOUT_OPS:
            changed |= _set_arg(node, _DROPOUT_OPS[node.target], "train", training)
        elif node.target in _BN_OPS:
            changed |= _set_arg(node, _BN_OPS[node.target], "training", bn_training)
        elif node.target is _SDPA:
            train_p = node.meta.setdefault(_TRAIN_VALUE, _arg(node, _SDPA_DROPOUT, "dropout_p", 0.0))
            changed |= _set_arg(node, _SDPA_DROPOUT, "dropout_p", train_p if training else 0.0)
        elif _is_batch_counter(node):
            increment = node.meta.setdefault(_TRAIN_VALUE, node.args[1])
            changed |= _set_arg(node, 1, "other", increment if bn_training else 0)
    if changed:
        graph.recompile()
    return changed


def _apply_mode(graph: torch.fx.GraphModule, mode: bool) -> None:
    from torchao.quantization.pt2e import FakeQuantizeBase

    observe = mode and not getattr(graph, OBSERVERS_FROZEN, False)
    for module in graph.modules():
        if isinstance(module, FakeQuantizeBase):
            module.enable_observer(observe)  # eval: ranges stay as trained (no validation data in them)
    set_graph_mode(graph, mode, mode and not getattr(graph, BN_FROZEN, False))
    graph.__dict__["_exported_training"] = mode  # torchao's own flag (export_utils._EXPORTED_TRAINING_ATTR)


def _train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    nn.Module.train(self, mode)
    _apply_mode(self, mode)
    return self


def _eval(self: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return _train(self, False)


def install_modes(graph: torch.fx.GraphModule, training: bool) -> torch.fx.GraphModule:
    """Make ``graph.train()``/``graph.eval()`` (and so the LightningModule's) switch the graph's
    behaviour, and put it in ``training`` mode now."""
    graph.train = types.MethodType(_train, graph)  # type: ignore[method-assign]
    graph.eval = types.MethodType(_eval, graph)  # type: ignore[method-assign]
    graph.train(training)
    return graph


def freeze_graph_batchnorm(graph: torch.fx.GraphModule) -> bool:
    """From now on BatchNorm uses and keeps its running statistics, in both modes; True the first time."""
    if getattr(graph, BN_FROZEN, False):
        return False
    setattr(graph, BN_FROZEN, True)
    _apply_mode(graph, graph.training)
    return True


def freeze_graph_observers(graph: torch.fx.GraphModule) -> bool:
    """From now on the quantization ranges stop updating, in both modes; True the first time."""
    if getattr(graph, OBSERVERS_FROZEN, False):
        return False
    setattr(graph, OBSERVERS_FROZEN, True)
    _apply_mode(graph, graph.training)
    return True


def _in_place(node: torch.fx.Node) -> bool:
    """An ``aten.<op>_.<overload>`` node (writes its first argument)."""
    parts = str(node.target).split(".")
    return len(parts) == 3 and parts[0] == "aten" and parts[1].endswith("_") and bool(node.args)


def restore_batchnorm_literals(graph: torch.fx.GraphModule, model: nn.Module) -> int:
    """Give the QAT graph's BatchNorm nodes their modules' own ``eps`` and ``momentum``; returns
    how many values changed.

    Why: torchao's conv-BN QAT fusion (``qat_utils._fuse_conv_bn_qat``) rebuilds every conv-BN with
    ``eps=1e-5`` and ``momentum=0.1`` ("TODO: allow setting eps"), in the batch-norm call and in
    the ``sqrt(running_var + eps)`` that scales the conv weight; the int8 fold then reads that eps.
    Each BatchNorm is found from the ``get_attr`` of its running statistics.
    """
    changed = 0
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BN_OPS and len(node.args) > 4:
            bn = _batchnorm_of(node.args[3], model)
            if bn is not None:
                changed += _set_arg(node, 6, "momentum", bn.momentum) + _set_arg(node, 7, "eps", bn.eps)
        elif node.target is _ATEN.add.Tensor and isinstance(node.args[1], float):
            bn = _batchnorm_of(node.args[0], model, "running_var")
            if bn is not None:
                changed += _set_arg(node, 1, "other", bn.eps)
    if changed:
        graph.recompile()
    return changed


def _batchnorm_of(node: Any, model: nn.Module, stat: str = "running_mean") -> Optional[nn.modules.batchnorm._BatchNorm]:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or not str(node.target).endswith(f".{stat}"):
        return None
    try:
        module = model.get_submodule(str(node.target).rsplit(".", 1)[0])
    except AttributeError:
        return None
    return module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None


def training_ops(graph: torch.fx.GraphModule) -> list[str]:
    """The nodes that still behave as in training: active dropout or attention dropout, BatchNorm
    on batch statistics, a batch counter update, any in-place write to a parameter or buffer."""
    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _DROPOUT_OPS and _arg(node, 2, "train", True) and _arg(node, 1, "p", 0.0):
            found.append(f"{node.name} (dropout p={_arg(node, 1, 'p', 0.0)})")
        elif node.target in _BN_OPS and _arg(node, 5, "training", True):
            found.append(f"{node.name} (batch_norm training=True)")
        elif node.target is _SDPA and _arg(node, _SDPA_DROPOUT, "dropout_p", 0.0):
            found.append(f"{node.name} (scaled_dot_product_attention dropout_p={_arg(node, 4, 'dropout_p', 0)})")
        elif _in_place(node):
            target = node.args[0]
            if isinstance(target, torch.fx.Node) and target.op in ("get_attr", "placeholder"):
                found.append(f"{node.name} (in-place {node.target} on {target.target})")
    return found


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
