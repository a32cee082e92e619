"""The fake-quantized graph's train and eval modes, which really switch.

Why not torchao's ``move_exported_model_to_eval``: its pattern rewrite replaces every dropout and
BatchNorm with its own literals (p=0.5, momentum=0.1, eps=1e-5, so a ``BatchNorm2d(eps=1e-3)`` or a
``Dropout(0.1)`` changes when the mode switches), and it leaves attention dropout
(``scaled_dot_product_attention(dropout_p=...)``) and the ``num_batches_tracked`` increment in
eval mode. :func:`set_graph_mode` flips only the mode arguments of those nodes, in place.

Example:
    >>> import torch
    >>> graph = torch.export.export(torch.nn.Dropout(0.1), (torch.ones(2, 3),)).module()
    >>> training_ops(graph)[0].endswith("(dropout p=0.1)")  # exported in training mode
    True
    >>> set_graph_mode(graph, training=False), training_ops(graph)
    (True, [])
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "freeze_graph_batchnorm",
    "freeze_graph_observers",
    "install_modes",
    "restore_batchnorm_literals",
    "set_graph_mode",
    "sync_graph_mode",
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
#: ``graph.meta`` keys (``meta`` survives ``copy.deepcopy``, instance attributes do not): what is
#: frozen, and the mode the graph's nodes are in now
BN_FROZEN, OBSERVERS_FROZEN = "lightning_trust_bn_frozen", "lightning_trust_observers_frozen"
APPLIED = "lightning_trust_applied_mode"


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

    observe = mode and not graph.meta.get(OBSERVERS_FROZEN, False)
    for module in graph.modules():
        if isinstance(module, FakeQuantizeBase):
            module.enable_observer(observe)  # eval: ranges stay as trained (no validation data in them)
    set_graph_mode(graph, mode, mode and not graph.meta.get(BN_FROZEN, False))
    graph.__dict__["_exported_training"] = mode  # torchao's own flag (export_utils._EXPORTED_TRAINING_ATTR)
    graph.meta[APPLIED] = _wanted(graph)


def _wanted(graph: torch.fx.GraphModule) -> tuple[bool, bool, bool]:
    return graph.training, bool(graph.meta.get(BN_FROZEN)), bool(graph.meta.get(OBSERVERS_FROZEN))


def sync_graph_mode(graph: torch.fx.GraphModule) -> bool:
    """Bring the graph's nodes to its ``training`` flag (and freezes) if they are not there yet:
    after ``copy.deepcopy`` (which drops the installed ``train``/``eval``) a plain ``.eval()``
    only sets the flag. True when it switched."""
    if graph.meta.get(APPLIED) == _wanted(graph):
        return False
    _apply_mode(graph, graph.training)
    return True


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
    if graph.meta.get(BN_FROZEN, False):
        return False
    graph.meta[BN_FROZEN] = True
    _apply_mode(graph, graph.training)
    return True


def freeze_graph_observers(graph: torch.fx.GraphModule) -> bool:
    """From now on the quantization ranges stop updating, in both modes; True the first time."""
    if graph.meta.get(OBSERVERS_FROZEN, False):
        return False
    graph.meta[OBSERVERS_FROZEN] = True
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
        elif _is_batch_counter(node):
            if node.args[1]:
                found.append(f"{node.name} (BatchNorm batch counter += {node.args[1]})")
        elif _in_place(node):
            target = node.args[0]
            if isinstance(target, torch.fx.Node) and target.op in ("get_attr", "placeholder"):
                found.append(f"{node.name} (in-place {node.target} on {target.target})")
    return found
