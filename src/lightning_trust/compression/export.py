"""The torch.export / PT2E side of quantization: export with a dynamic batch, insert fake
quantization (``prepare_qat_pt2e``), convert to a real int8 graph, compile and load it.

Why PT2E (``torch.export`` -> ``prepare_qat_pt2e`` -> ``convert_pt2e`` with the X86 Inductor
quantizer, then ``torch.compile``): it is the path PyTorch supports going forward (``torch.ao``
eager QAT is deprecated and Lightning's own QAT callback was removed in 2.0), and it measured
faster here: on SmallCNN (batch 64, one CPU thread) 4.1x over fp32 eager against 3.0x for eager
``torch.ao`` QAT (fbgemm/x86). Pitfalls handled here:

* an exported graph's ``.train()``/``.eval()`` switch nothing by themselves: the fake-quant graph
  gets its own mode switch (:mod:`lightning_trust.compression.qat_graph`), which the int8
  conversion uses too, so the int8 program has no dropout, attention dropout or BatchNorm update;
* an exported graph fixes the batch size unless dynamic shapes are given: the batch dimension is
  exported as ``Dim("batch")`` on every input with the batch's leading size (a batch of one is
  tiled to two for tracing), so the last, smaller batch and any inference batch work;
* the module is exported as it is called: keyword arguments (Hugging Face models) and several
  positional inputs, in one canonical form (:class:`~lightning_trust.compression.qat_graph.ForwardCall`);
* a module called twice (``self.relu`` in a ResNet block) merges into one quantizer partition
  with two outputs: each call is given its own (:func:`split_reused_modules`);
* ``convert_pt2e`` keeps the dead fp32 weights next to their int8 copies: unused parameters and
  buffers are dropped and the graph is re-exported, so the file holds only what the graph uses.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> model.__dict__["forward"] = lambda x: x  # what QAT does: the instance's forward is routed elsewhere
    >>> with plain_forward(model) as float_model:
    ...     float_model(torch.ones(1, 3)).shape
    torch.Size([1, 2])
    >>> model(torch.ones(1, 3)).shape
    torch.Size([1, 3])

    The PT2E flow (seconds per call, hence skipped here; the tests run it)::

    >>> prepared = quantize_prepare(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()), torch.randn(4, 3))  # doctest: +SKIP
    >>> prepared(torch.randn(7, 3)).shape  # any batch size  # doctest: +SKIP
    torch.Size([7, 4])
    >>> converted, program = convert_to_int8(prepared, torch.randn(4, 3))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from lightning_trust.compression.examples import repeat_rows
from lightning_trust.compression.export_refusal import export_refusal
from lightning_trust.compression.qat_call import ForwardCall
from lightning_trust.compression.qat_graph import (
    install_modes,
    restore_batchnorm_literals,
    set_graph_mode,
    training_ops,
)
from lightning_trust.core.passes import saved_modes
from lightning_trust.core.seam import flat_outputs, inductor_config
from lightning_trust.core.tensors import map_tensors, tensor_bytes

__all__ = [
    "QAT_ATTR",
    "compile_int8",
    "convert_to_int8",
    "drop_unused_state",
    "export_call",
    "export_dynamic_batch",
    "float_copy",
    "load_int8_model",
    "plain_forward",
    "program_bytes",
    "quantize_prepare",
    "remove_batch_counters",
    "set_batchnorm_training",
    "split_reused_modules",
]

#: Name under which QuantizationAwareTraining registers the fake-quantized graph on the LightningModule.
QAT_ATTR = "lightning_trust_qat"

_BN_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default", "aten.cudnn_batch_norm.default")


@contextlib.contextmanager
def plain_forward(module: nn.Module) -> Iterator[nn.Module]:
    """The module's own (float) ``forward`` while inside, even when QAT routes it through fake quantization."""
    override = module.__dict__.pop("forward", None)
    try:
        yield module
    finally:
        if override is not None:
            module.__dict__["forward"] = override


def export_call(module: nn.Module, example: Any) -> Any:
    """``torch.export.export`` of ``module`` called as ``example`` (a :class:`ForwardCall`, or a
    batch's inputs: tensor, keyword dict, :class:`PositionalInputs`), batch dimension dynamic.

    Every tensor whose leading size is the batch size gets ``Dim("batch")``; a batch of one is
    tiled to two rows first (torch.export specializes a size-1 dimension to the constant 1).
    """
    from torch.export import Dim

    call = ForwardCall.from_inputs(module, example)
    size = call.batch_size()
    if size == 1:
        call = call.map(lambda t: repeat_rows(t, 2) if t.ndim > 0 else t)
        size = 2
    batch = Dim("batch", min=1)

    def spec(value: Any) -> Any:
        return map_tensors(value, lambda t: {0: batch} if t.ndim > 0 and t.shape[0] == size else None)

    shapes = tuple(spec(a) for a in call.args) + tuple(spec(v) for v in call.kwargs.values())
    _register_hf_caches()
    return torch.export.export(module, call.args, call.kwargs, dynamic_shapes=shapes if size else None)


def export_dynamic_batch(module: nn.Module, example: Any) -> Any:
    """:func:`export_call` (the name this module has always exported)."""
    return export_call(module, example)


def _register_hf_caches() -> None:
    """Let torch.export flatten Hugging Face's ``DynamicCache`` (GPT-2 returns one unless
    ``use_cache=False``), with transformers' own registration, when transformers is in use."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:  # an older transformers: export reports the cache type itself
        return
    register_dynamic_cache_export_support()


def float_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with its own float ``forward`` and without the fake-quant graph."""
    with plain_forward(module):
        clone = copy.deepcopy(module)
    if QAT_ATTR in clone._modules:
        del clone._modules[QAT_ATTR]
    return clone


def split_reused_modules(graph_module: torch.fx.GraphModule) -> int:
    """Give each call of a module called several times (``self.relu`` twice in a ResNet block) its
    own source partition; returns how many nodes were relabelled.

    Why: non-strict ``torch.export`` leaves ``source_fn_stack`` empty, so the quantizers group nodes
    by the innermost ``nn_module_stack`` path, which is the same for every call of one module: the
    X86 Inductor quantizer then finds a ReLU "partition" with two outputs and raises ``Input
    partition has more than one output node``. The stack's key tells the calls apart
    (``...relu`` and ``...relu@1``); appending that suffix to the path makes one partition per call.
    """
    relabelled = 0
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        key, (path, cls) = list(stack.items())[-1]
        _, at, call = str(key).rpartition("@")
        if at and call.isdigit() and not str(path).endswith(f"@{call}"):
            stack[key] = (f"{path}@{call}", cls)
            relabelled += 1
    return relabelled


def quantize_prepare(model: nn.Module, example: Any) -> torch.fx.GraphModule:
    """Export ``model`` (train mode, dynamic batch) and insert QAT fake quantization for the X86 Inductor backend.

    ``example``: how the model is called (a :class:`ForwardCall`, or a batch's inputs). The
    returned graph shares the model's parameters (the optimizer keeps training them), takes the
    call's canonical form and switches modes with ``.train()``/``.eval()``
    (:func:`~lightning_trust.compression.qat_graph.install_modes`); nothing is attached to
    ``model``. Raises naming the module when the model cannot be exported or holds nothing the
    quantizer can quantize.
    """
    from torchao.quantization.pt2e import FakeQuantizeBase
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    try:
        with saved_modes(model, training=True), plain_forward(model):
            exported = export_call(model, example).module()
    except Exception as err:
        raise export_refusal(model, example, err) from err
    split_reused_modules(exported)
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    try:
        prepared = prepare_qat_pt2e(exported, quantizer)
    except Exception as err:
        raise RuntimeError(
            f"QuantizationAwareTraining cannot quantize {type(model).__name__}: torchao's prepare_qat_pt2e (X86 "
            f"Inductor quantizer) failed: {type(err).__name__}: {err}. Pass `example_input` matching the forward, or "
            "leave this model out of QAT."
        ) from err
    restore_batchnorm_literals(prepared, model)
    if not any(isinstance(m, FakeQuantizeBase) for m in prepared.modules()):
        raise ValueError(
            f"QuantizationAwareTraining found nothing to quantize in {type(model).__name__}: the X86 Inductor "
            "quantizer annotates Conv/Linear (and their fused activations); this model has none in its forward. "
            "Remove QuantizationAwareTraining for this model."
        )
    model_params = {id(p) for p in model.parameters()}
    foreign = [n for n, p in prepared.named_parameters() if id(p) not in model_params]
    if foreign:
        raise RuntimeError(
            f"torch.export copied parameters {foreign[:3]}; QAT would train copies the optimizer never sees."
        )
    return install_modes(prepared, training=True)


def set_batchnorm_training(graph_module: torch.fx.GraphModule, training: bool) -> bool:
    """Set the ``training`` flag of every batch-norm node of an exported graph; True when one changed."""
    changed = False
    for node in graph_module.graph.nodes:
        if (
            node.op == "call_function"
            and str(node.target) in _BN_OPS
            and len(node.args) > 5
            and node.args[5] != training
        ):
            args = list(node.args)
            args[5] = training
            node.args = tuple(args)
            changed = True
    if changed:
        graph_module.recompile()
    return changed


def drop_unused_state(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove parameters and buffers the graph never reads (``convert_pt2e`` keeps the dead fp32 weights)."""
    used = {str(node.target) for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph_module.named_parameters()) + list(graph_module.named_buffers()):
        if name not in used:
            owner_name, _, leaf = name.rpartition(".")
            owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
            delattr(owner, leaf)
    graph_module.delete_all_unused_submodules()
    return graph_module


def remove_batch_counters(graph_module: torch.fx.GraphModule) -> int:
    """Erase BatchNorm's ``num_batches_tracked += ...`` nodes (an int8 program updates no statistics)."""
    counters = [n for n in graph_module.graph.nodes if n.op == "call_function" and _is_counter(n)]
    for node in counters:
        graph_module.graph.erase_node(node)
    if counters:
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
    return len(counters)


def _is_counter(node: torch.fx.Node) -> bool:
    target = node.args[0] if node.args else None
    return (
        node.target is torch.ops.aten.add_.Tensor
        and isinstance(target, torch.fx.Node)
        and str(target.target).endswith("num_batches_tracked")
        and not node.users
    )


def convert_to_int8(prepared: torch.fx.GraphModule, example: Any) -> tuple[torch.fx.GraphModule, Any]:
    """A real int8 model from a QAT graph (left untouched): ``convert_pt2e`` on a copy in eval mode,
    batch counters and dead weights dropped, re-exported with a dynamic batch. Returns the
    converted graph and its ExportedProgram; raises if a training-mode op is left in it."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    clone = copy.deepcopy(prepared).cpu()
    set_graph_mode(clone, training=False)
    clone.__dict__["_exported_training"] = False  # torchao's flag (export_utils._EXPORTED_TRAINING_ATTR)
    with flat_outputs(clone) as restore:  # its constant folding cannot rebuild a DynamicCache output from placeholders
        converted = restore(convert_pt2e(clone))
    remove_batch_counters(converted)
    converted = drop_unused_state(converted)
    program = export_call(converted, example)
    left = training_ops(converted) + training_ops(program.graph_module)
    mutated = list(program.graph_signature.buffers_to_mutate.values())
    if left or mutated:
        raise RuntimeError(
            f"The int8 program still has training-mode operations {left + mutated}: its outputs would not be "
            "deterministic. Remove them from the forward (dropout without `self.training`), or leave this model out "
            "of QAT."
        )
    return converted, program


def program_bytes(program: Any) -> int:
    """Bytes of the tensors an ExportedProgram carries (its weights, without the serialized graph)."""
    return tensor_bytes(list(program.state_dict.values()) + list(program.constants.values()))


def compile_int8(model: nn.Module) -> Any:
    """``torch.compile`` with Inductor weight freezing, which lowers the int8 patterns to oneDNN kernels.

    Compiled with static shapes (one graph per batch size): Inductor's quantized-conv lowering
    mis-computes output strides under a symbolic batch dimension in torch 2.13.
    """
    compiled = torch.compile(model, dynamic=False)
    config = inductor_config()

    def run(*args: Any, **kwargs: Any) -> Any:
        with config.patch(freezing=True), torch.no_grad():
            return compiled(*args, **kwargs)

    return run


def load_int8_model(path: Union[str, Path], compile: bool = False) -> Any:
    """Load an int8 model exported by :class:`~lightning_trust.compression.QuantizationAwareTraining`
    (works in a fresh process); ``compile=True`` returns it compiled (:func:`compile_int8`).

    Example:
        >>> model = load_int8_model("runs/digits/lightning_trust/quantization/model_int8.pt2")  # doctest: +SKIP
        >>> model(torch.zeros(5, 1, 8, 8)).shape  # doctest: +SKIP
        torch.Size([5, 10])
    """
    import torchao.quantization.pt2e  # noqa: F401  registers the quantized_decomposed ops the graph calls

    try:
        program = torch.export.load(str(path))
    except RuntimeError:  # a program returning Hugging Face outputs needs their pytree nodes registered first
        if importlib.util.find_spec("transformers") is None:
            raise
        importlib.import_module("transformers.modeling_outputs")  # ModelOutput classes register on import
        _register_hf_caches()
        program = torch.export.load(str(path))
    module = program.module()
    return compile_int8(module) if compile else module
