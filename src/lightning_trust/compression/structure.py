"""The pruned structure: tracing a model with torch-pruning, recording what one pruning step
changed, and replaying the recorded pruning on a fresh model (resume, ``test(ckpt_path=...)``,
loading outside Lightning).

A checkpoint written with :class:`~lightning_trust.compression.ProgressivePruning` holds, under
:data:`CHECKPOINT_KEY`, torch-pruning's pruning history (which channels each step removed) and the
example input the model was traced with; :func:`restore_pruned_structure` replays it and
:func:`load_pruned_checkpoint` builds, restores and loads a module in one call.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> output_layers(model, torch.zeros(3, 4))
    ['2']
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops as tp_ops

from lightning_trust.compression.checkpoints import callback_state, peek_checkpoint
from lightning_trust.compression.examples import on_device
from lightning_trust.compression.export import QAT_ATTR
from lightning_trust.compression.heads import find_heads, root_parameters
from lightning_trust.core.batch import DEFAULT_INPUT_KEYS, PositionalInputs, call_module
from lightning_trust.core.passes import isolated_eval, saved_modes
from lightning_trust.core.seam import adopt_tensors, pruning_graph_names
from lightning_trust.core.tensors import iter_tensors

__all__ = [
    "CHECKPOINT_KEY",
    "CONV1D_REFUSAL",
    "PruningOp",
    "build_graph",
    "check_adapters",
    "check_pruners",
    "load_pruned_checkpoint",
    "output_layers",
    "plain_idxs",
    "prune_groups",
    "rebuild_for_checkpoint",
    "restore_dense",
    "restore_pruned_structure",
    "trace_error",
    "traced_inputs",
]

#: Top-level checkpoint key holding what a loader needs to rebuild the pruned structure.
CHECKPOINT_KEY = "lightning_trust_pruning"

_PRUNABLE: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# tracing --------------------------------------------------------------------------------------
def traced_inputs(example: Any) -> Any:
    """``example`` as torch-pruning's ``example_inputs``: a dict of model keyword arguments is
    passed as ``model(**example)``, anything else as the one positional input (``call_module``'s rule)."""
    if isinstance(example, Mapping) and any(k in example for k in DEFAULT_INPUT_KEYS):
        return (example,)  # a dict that is one input, not keyword arguments
    if isinstance(example, PositionalInputs):
        return tuple(example)  # several positional inputs: model(*inputs), as call_module
    if isinstance(example, (tuple, list)):
        return (example,)  # torch-pruning unpacks sequences; the pack passes them as one input
    return dict(example) if isinstance(example, Mapping) else example


def output_layers(model: nn.Module, example_input: Any, prunable: tuple[type, ...] = _PRUNABLE) -> list[str]:
    """Names of the prunable layers whose outputs reach the model's output without passing another one.

    Found on the autograd graph of one forward pass: pruning their output channels would change
    the model's output shape, so they are ignored by default.
    """
    produced: dict[Any, str] = {}
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.grad_fn is not None:
            produced[output.grad_fn] = names[module]

    for module in model.modules():
        if isinstance(module, prunable):
            handles.append(module.register_forward_hook(hook))
    try:
        with saved_modes(model, training=False), torch.enable_grad():
            outputs = call_module(model, example_input)
    finally:
        for h in handles:
            h.remove()
    found: list[str] = []
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in iter_tensors(outputs) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if fn in produced:
            if produced[fn] not in found:
                found.append(produced[fn])
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def build_graph(
    model: nn.Module,
    example_input: Any,
    customized_pruners: Optional[dict[Any, Any]] = None,
    attention: Optional[list[Any]] = None,
) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, traced in an isolated pass (modes, RNGs, grads restored);
    with ``attention`` modules, the root parameters on the residual stream are pruned with it."""
    hidden = attention[0].projections[0].in_features if attention else 0
    unwrapped = root_parameters(model, hidden) if attention else None
    try:
        with isolated_eval(model, grad=True):  # torch-pruning's trace leaves the model in eval mode otherwise
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=traced_inputs(example_input),
                customized_pruners=customized_pruners,
                unwrapped_parameters=unwrapped,
            )
    except Exception as err:  # tracing failures surface as many exception types
        raise trace_error(model, example_input, err) from err


def trace_error(model: nn.Module, example_input: Any, err: Exception) -> RuntimeError:
    """The refusal for a model torch-pruning cannot trace, naming the input tried and the fix."""
    described = (
        f"Tensor{tuple(example_input.shape)}" if isinstance(example_input, Tensor) else type(example_input).__name__
    )
    return RuntimeError(
        f"torch-pruning could not trace {type(model).__name__} with an example input of "
        f"{described}: {type(err).__name__}: {err}. Pass `example_input` (a tensor or a shape) that "
        "the model's forward accepts, or `batch_keys` if the inputs are not found in the batch."
    )


def check_pruners(
    model: nn.Module,
    example: Any,
    ignored: list[str],
    customized_pruners: Optional[dict[Any, Any]] = None,
    unwrapped: Optional[list[nn.Parameter]] = None,
) -> None:
    """Refuse a layer with weights that torch-pruning has no pruner for, and adapter-wrapped layers.

    torch-pruning would treat its weights as "unwrapped parameters" and guess the channel
    dimension (the last non-singleton one): a wrong guess breaks shapes or silently prunes the
    wrong axis. Only layers that run in the forward pass are checked; the root parameters in
    ``unwrapped`` (a ViT's class token and position embeddings) are pruned on their known dimension.
    A LoRA-wrapped layer (PEFT's ``base_layer`` with adapters) would have its base layer pruned but
    not its adapters.
    """
    check_adapters(model)
    known = {id(p) for p in unwrapped or []}
    ignored_modules = {m for n in ignored for m in model.get_submodule(n).modules()}
    custom = tuple(t for t in (customized_pruners or {}) if isinstance(t, type))
    ran: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, i, o: ran.append(mod)) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            call_module(model, example)
    finally:
        for h in handles:
            h.remove()
    names = {m: n for n, m in model.named_modules()}
    for module in dict.fromkeys(ran):
        own = [p for p in module.parameters(recurse=False) if id(p) not in known]
        if module in ignored_modules or not own:
            continue
        if isinstance(module, custom) or module in (customized_pruners or {}):
            continue
        if tp_ops.module2type(module) == tp_ops.OPTYPE.ELEMENTWISE:
            name = names.get(module, type(module).__name__)
            if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
                raise ValueError(CONV1D_REFUSAL.format(name=name))
            raise ValueError(
                f"Layer {name!r} ({type(module).__name__}) has parameters but torch-pruning has no pruner for it "
                f"(it would guess which dimension is the channel). Add it to `ignored_layers: [{name!r}]`, or pass "
                f"`customized_pruners={{{type(module).__name__}: MyPruner()}}` (a `tp.pruner.BasePruningFunc`)."
            )


#: Why a transformers ``Conv1D`` layer (GPT-2) is refused, and the fix.
CONV1D_REFUSAL = (
    "Layer {name!r} is a transformers Conv1D (a transposed nn.Linear; GPT-2 fuses the q, k and v of every head in "
    "`c_attn` and splits them by `split_size`), which torch-pruning has no pruner for: its heads and the attributes "
    "`embed_dim`, `split_size`, `num_heads` cannot be pruned consistently. Use a model with nn.Linear q/k/v "
    "projections (BERT, ViT, Llama-style q_proj/k_proj/v_proj), or pass `customized_pruners={{Conv1D: ...}}` with a "
    "pruner that keeps q, k and v of each head aligned."
)


def check_adapters(model: nn.Module) -> None:
    """Refuse adapter-wrapped layers (PEFT LoRA: a ``base_layer`` next to ``lora_A``/``lora_B``)."""
    names = {m: n for n, m in model.named_modules()}
    wrapped = [names[m] for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    if wrapped:
        raise ValueError(
            f"{len(wrapped)} layers are LoRA-wrapped (e.g. {wrapped[0]!r}): pruning would shrink their base layers "
            "but not their adapters (lora_A/lora_B). Prune the model before wrapping it (call `get_peft_model` on "
            "the pruned model), or merge the adapters first (`model = peft_model.merge_and_unload()`)."
        )


# one pruning step -----------------------------------------------------------------------------
def plain_idxs(idxs: Any) -> list[int]:
    """torch-pruning's channel indices as plain ints (its hybrid indices carry the plain one as ``.idx``)."""
    return [int(getattr(i, "idx", i)) for i in idxs]


@dataclass
class PruningOp:
    """One pruning operation of a step, recorded to replay it on the optimizer state."""

    name: str
    handler: Any
    pruning_dim: int
    idxs: list[int]
    is_param: bool = False

    def apply(self, target: Any) -> Any:
        """Prune ``target`` (a copy of the layer, or a bare parameter) the way this operation pruned the model."""
        self.handler.__self__.pruning_dim = self.pruning_dim
        return self.handler(target, self.idxs)


def prune_groups(graph: tp.DependencyGraph, groups: Any, ops: list[PruningOp], snapshots: dict[str, nn.Module]) -> None:
    """Prune each group of ``groups`` (a pruner's interactive step), recording every operation in
    ``ops`` and a copy of each layer with parameters, as it was before, in ``snapshots``."""
    param_names, module_names = pruning_graph_names(graph)
    for group in groups:
        for dep, idxs in group:
            target = dep.target
            if target.type == tp_ops.OPTYPE.PARAMETER:
                ops.append(
                    PruningOp(param_names[target.module], dep.handler, target.pruning_dim, plain_idxs(idxs), True)
                )
                continue
            name = module_names.get(target.module)
            if name is None:  # a functional op (relu, add, flatten...): nothing to carry
                continue
            if name not in snapshots and next(target.module.parameters(recurse=False), None) is not None:
                snapshots[name] = copy.deepcopy(target.module)
            ops.append(PruningOp(name, dep.handler, target.pruning_dim, plain_idxs(idxs)))
        group.prune()


# replay ---------------------------------------------------------------------------------------
def restore_dense(model: nn.Module, skeleton: nn.Module) -> None:
    """Give ``model`` the dense shapes of ``skeleton`` again (parameters, buffers, size attributes such as
    ``out_channels``), like torch-pruning's serialization does, but only from each module's ``__dict__``."""
    dense = dict(copy.deepcopy(skeleton).named_modules())
    for name, module in model.named_modules():
        source = dense.get(name)
        if source is None or not name:
            continue
        adopt_tensors(module, source)
        for key, value in vars(source).items():
            if (
                not key.startswith("_")
                and isinstance(value, (int, float, bool, tuple))
                and not isinstance(value, Tensor)
            ):
                setattr(module, key, value)


def restore_pruned_structure(
    model: nn.Module,
    checkpoint: Union[str, Path, Mapping[str, Any]],
    customized_pruners: Optional[dict[Any, Any]] = None,
    applied: Optional[list[list[Any]]] = None,
) -> nn.Module:
    """Prune a freshly built (unpruned) ``model`` into the structure saved in a pruning checkpoint.

    Replays torch-pruning's pruning history (which channels each step removed) with a dependency
    graph traced on the example input stored in the checkpoint; the weights are loaded afterwards
    with ``model.load_state_dict(checkpoint["state_dict"])``. ``applied`` is the part of the history
    the model already has (it is not replayed again).

    Example (outside Lightning):
        >>> checkpoint = torch.load("last.ckpt", weights_only=True)  # doctest: +SKIP
        >>> model = SmallCNN(**checkpoint["hyper_parameters"])  # doctest: +SKIP
        >>> restore_pruned_structure(model, checkpoint)  # doctest: +SKIP
        >>> model.load_state_dict(checkpoint["state_dict"])  # doctest: +SKIP
    """
    if not isinstance(checkpoint, Mapping):
        loaded = peek_checkpoint(checkpoint)
        if loaded is None:
            raise FileNotFoundError(f"No checkpoint at {checkpoint}.")
        checkpoint = loaded
    info = checkpoint.get(CHECKPOINT_KEY)
    if info is None:
        info = callback_state(checkpoint, "ProgressivePruning", "ProgressivePruning")
    if info is None:
        raise KeyError(
            "The checkpoint holds no pruning structure (no ProgressivePruning state): it was not written by a "
            "Trainer with the ProgressivePruning callback. Load it with the class's own `load_from_checkpoint`."
        )
    history = [list(h) for h in info.get("history", [])]
    applied = [list(h) for h in (applied or [])]
    if history[: len(applied)] != applied:
        raise RuntimeError(
            "The model is already pruned differently from this checkpoint; build a fresh (unpruned) model and "
            "load it with `load_pruned_checkpoint(ModelClass, path)`."
        )
    todo = history[len(applied) :]
    if todo:
        example = info.get("example_input")
        if example is None:
            raise KeyError("The pruning checkpoint has no example input to trace the model with.")
        heads = find_heads(model)  # on the structure before the replay, which the history starts from
        graph = build_graph(model, on_device(example, model), customized_pruners, heads.attention)
        graph.load_pruning_history(todo)
        heads.sync(model)
    return model


def rebuild_for_checkpoint(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    applied: list[list[Any]],
    skeleton: Optional[nn.Module],
    customized_pruners: Optional[dict[Any, Any]] = None,
) -> Optional[list[list[Any]]]:
    """Bring ``model`` (pruned by the history ``applied``) to the checkpoint's structure before its
    weights are loaded, un-pruning it to ``skeleton`` (its dense copy) when it was pruned differently;
    returns the checkpoint's history, or ``None`` when the checkpoint holds no pruning structure."""
    if CHECKPOINT_KEY not in checkpoint:
        return None
    saved = [list(h) for h in checkpoint[CHECKPOINT_KEY]["history"]]
    if saved[: len(applied)] != applied:
        if skeleton is None:
            raise RuntimeError(
                "The module is pruned differently from the checkpoint and its dense structure is unknown; "
                "pass a freshly built model (or use `load_pruned_checkpoint`)."
            )
        restore_dense(model, skeleton)
        applied = []
    restore_pruned_structure(model, checkpoint, customized_pruners, applied=applied)
    return saved


def load_pruned_checkpoint(
    cls: type[pl.LightningModule],
    checkpoint_path: Union[str, Path],
    map_location: Any = None,
    strict: bool = True,
    customized_pruners: Optional[dict[Any, Any]] = None,
    **kwargs: Any,
) -> pl.LightningModule:
    """``cls.load_from_checkpoint`` for a checkpoint written with :class:`ProgressivePruning`.

    ``load_from_checkpoint`` on the plain class builds the unpruned shapes and fails on a size
    mismatch; this builds the model from the saved hyperparameters (``kwargs`` override them),
    rebuilds the pruned structure, then loads the float weights (a checkpoint written during
    quantization-aware training also holds the fake-quant graph's state, which is left out: the
    int8 model is the exported ``.pt2``). Works without a Trainer.

    Example:
        >>> model = load_pruned_checkpoint(SmallCNN, "runs/digits/last.ckpt")  # doctest: +SKIP
        >>> model.eval()(torch.zeros(1, 1, 8, 8)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """
    checkpoint = peek_checkpoint(checkpoint_path)
    if checkpoint is None:
        raise FileNotFoundError(f"No checkpoint at {checkpoint_path}.")
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters") or {}).items() if not str(k).startswith("_")}
    hparams.update(kwargs)
    signature = inspect.signature(cls.__init__)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        hparams = {k: v for k, v in hparams.items() if k in signature.parameters}
    model = cls(**hparams)
    restore_pruned_structure(model, checkpoint, customized_pruners=customized_pruners)
    model.on_load_checkpoint(checkpoint)
    # a checkpoint written during QuantizationAwareTraining also holds the fake-quant graph's state:
    # the float model loads its own weights (the int8 model is the exported .pt2)
    weights = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(f"{QAT_ATTR}.")}
    model.load_state_dict(weights, strict=strict)
    if map_location is not None:
        model = model.to(map_location)
    return model
