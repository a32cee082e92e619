"""Structural pruning during training with torch-pruning: channels and neurons are removed, so the
model really gets smaller and faster (Lightning's ``ModelPruning`` only masks weights)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch_pruning import _helpers as tp_helpers
from torch_pruning import ops as tp_ops

from lightning_trust.core.batch import BatchContract, Key
from lightning_trust.compression._common import (
    QAT_ATTR,
    callback_state,
    collect_predictions,
    cpu_copy,
    example_from,
    example_from_spec,
    map_tensors,
    measure_latency,
    on_checkpoint_load,
    peek_checkpoint,
    plain_forward,
    reduced_mean,
    repeat_rows,
    rewrap_ddp,
    val_dataloaders,
)
from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.core import artifact_dir, find_callback, isolated_eval, new_figure, save_figure, write_json

Schedule = Literal["cubic", "linear", "one_shot"]
ImportanceName = Literal["group_magnitude", "taylor", "lamp", "bn_scale", "hessian", "random"]

#: Top-level checkpoint key holding what a loader needs to rebuild the pruned structure.
CHECKPOINT_KEY = "lightning_trust_pruning"

_IMPORTANCES: dict[str, Callable[[], Any]] = {
    "group_magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "hessian": lambda: tp.importance.GroupHessianImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}
_GRADIENT_IMPORTANCES = ("taylor", "hessian")
#: Channel-ratio increment while pruning towards a MACs target.
_MACS_SEARCH_STEP = 0.02


def pruning_schedule(schedule: Schedule, final: float, steps: int) -> list[float]:
    """The target sparsity after each of ``steps`` pruning steps.

    ``cubic`` is Zhu & Gupta (2017), eq. 1 with initial sparsity 0: ``s_t = s_f + (0 - s_f)(1 - t/n)^3``
    for ``t = 1..n``; ``linear`` is ``s_f t / n``; ``one_shot`` is ``[s_f]``.

    Example:
        >>> [round(s, 4) for s in pruning_schedule("cubic", 0.5, 3)]
        [0.3519, 0.4815, 0.5]
    """
    if schedule == "one_shot":
        return [final]
    if steps < 1:
        raise ValueError(f"A {schedule} schedule needs at least one pruning step, got {steps}.")
    if schedule == "cubic":
        return [final + (0.0 - final) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]
    if schedule == "linear":
        return [final * t / steps for t in range(1, steps + 1)]
    raise ValueError(f"`schedule` must be 'cubic', 'linear' or 'one_shot', got {schedule!r}.")


def output_layers(model: nn.Module, example_input: Any, prunable: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) -> list[str]:
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
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad():
            outputs = model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    roots = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    found: list[str] = []
    seen: set[int] = set()
    stack = list(roots)
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


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def count_macs_params(model: nn.Module, example_input: Any) -> tuple[float, int]:
    """MACs of one sample (the first row of ``example_input``) and parameters, by torch-pruning's counter.

    One row, because ``tp.utils.count_ops_and_params`` averages layers over the batch but not
    element-wise ops; MACs may be fractional (pooling counts half operations).
    """
    sample = map_tensors(example_input, lambda t: t[:1] if t.ndim else t)
    macs, params = tp.utils.count_ops_and_params(model, sample)
    return float(macs), int(params)


def _find_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _build_graph(model: nn.Module, example_input: Any, customized_pruners: Optional[dict[Any, Any]] = None) -> tp.DependencyGraph:
    try:
        with isolated_eval(model, grad=True):  # torch-pruning's trace leaves the model in eval mode otherwise
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, customized_pruners=customized_pruners)
    except Exception as err:  # tracing failures surface as many exception types
        raise _trace_error(model, example_input, err) from err


def _trace_error(model: nn.Module, example_input: Any, err: Exception) -> RuntimeError:
    """The refusal for a model torch-pruning cannot trace, naming the input tried and the fix."""
    return RuntimeError(
        f"torch-pruning could not trace {type(model).__name__} with an example input of "
        f"{_describe(example_input)}: {type(err).__name__}: {err}. Pass `example_input` (a tensor or a shape) that "
        "the model's forward accepts, or `batch_keys` if the inputs are not found in the batch."
    )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    return type(value).__name__


def _plain(idxs: Any) -> list[int]:
    if len(idxs) > 0 and isinstance(idxs[0], tp_helpers._HybridIndex):
        idxs = tp_helpers.to_plain_idxs(idxs)
    return [int(i) for i in idxs]


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
        >>> checkpoint = torch.load("last.ckpt", weights_only=True)
        >>> model = SmallCNN(**checkpoint["hyper_parameters"])
        >>> restore_pruned_structure(model, checkpoint)
        >>> model.load_state_dict(checkpoint["state_dict"])
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
        device = next(iter(model.parameters()), torch.empty(0)).device
        example = example.to(device) if isinstance(example, Tensor) else example
        graph = _build_graph(model, example, customized_pruners)
        graph.load_pruning_history(todo)
    return model


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
        >>> model = load_pruned_checkpoint(SmallCNN, "runs/digits/last.ckpt")
        >>> model.eval()(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
    """
    import inspect

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


def _restore_dense(model: nn.Module, skeleton: nn.Module) -> None:
    """Give ``model`` the dense shapes of ``skeleton`` again (parameters, buffers, size attributes such as
    ``out_channels``), like torch-pruning's serialization does, but only from each module's ``__dict__``."""
    dense = dict(copy.deepcopy(skeleton).named_modules())
    for name, module in model.named_modules():
        source = dense.get(name)
        if source is None or not name:
            continue
        module._parameters = source._parameters
        module._buffers = source._buffers
        for key, value in vars(source).items():
            if not key.startswith("_") and isinstance(value, (int, float, bool, tuple)) and not isinstance(value, Tensor):
                setattr(module, key, value)


@dataclass
class _Op:
    """One pruning operation of a step, recorded to replay it on the optimizer state."""

    name: str
    handler: Any
    pruning_dim: int
    idxs: list[int]
    is_param: bool = False


class ProgressivePruning(Callback):
    """Prune channels/neurons progressively during ``fit`` with torch-pruning's DependencyGraph.

    Coupled layers (a conv's output channels, the next BatchNorm and the next layer's input
    channels) are removed together, so parameters, MACs and CPU latency really drop. Pruning steps
    happen after the first training batch of each scheduled epoch (so gradient importances see a
    real batch); the optimizers keep working on the new parameters with their state (momentum,
    Adam moments) carried over for the kept channels.

    Works in the same ``fit`` as :class:`~lightning_trust.privacy.DifferentialPrivacy`: the DP
    callback re-attaches Opacus's per-sample-gradient hooks to the pruned layers, the DP optimizer
    keeps the pruned parameters, and the importances (weights, or the noised gradients) are
    post-processing of the private model, so ε is unchanged.

    Args:
        pruning_ratio: final share of channels removed from each prunable layer (or globally with
            ``global_pruning``). Exclusive with ``target_macs_ratio``/``target_speedup``.
        target_macs_ratio: prune until the measured MACs are at most this share of the dense MACs.
        target_speedup: the same as ``target_macs_ratio = 1 / target_speedup`` (a MACs speedup; the
            measured CPU latency ratio is in the report).
        importance: channel importance (torch-pruning): ``"group_magnitude"``, ``"taylor"``,
            ``"lamp"``, ``"bn_scale"``, ``"hessian"`` or ``"random"``.
        global_pruning: rank channels across layers instead of the same ratio per layer.
        schedule: ``"cubic"`` (Zhu & Gupta 2017), ``"linear"`` or ``"one_shot"``.
        start_epoch: first epoch with a pruning step.
        end_epoch: last epoch with a pruning step; default: ``max_epochs // 2`` (the rest fine-tunes).
        frequency: epochs between pruning steps.
        ignored_layers: module names never pruned; default: the output layer(s), found on the
            autograd graph. Names given here are ignored in addition.
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly shapes).
        max_pruning_ratio: no layer loses more than this share of its channels.
        sparsity_regularization: > 0 trains with torch-pruning's group-norm regularizer
            (``GroupNormPruner``; ``BNScalePruner`` for ``"bn_scale"``) pushing unimportant groups to zero.
        example_input: a tensor, or a shape like ``[1, 1, 8, 8]``; default: the first training
            batch's inputs (read through the batch contract); with ``DifferentialPrivacy`` in the
            Trainer only their shapes (zeros), so no training record is stored in the checkpoint.
        batch_keys: where inputs/targets are in a batch (see :class:`~lightning_trust.core.batch.BatchContract`).
        measure_latency: measure dense vs pruned CPU latency for the report.
        evaluate: compute validation accuracy before the first step and at the end.
        customized_pruners: ``{layer type: tp.pruner.BasePruningFunc}`` for custom layers (Python only).

    Example:
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=4)])
        >>> trainer.fit(SmallCNN(), DigitsDataModule())
        >>> model = load_pruned_checkpoint(SmallCNN, trainer.checkpoint_callback.last_model_path)
    """

    report_section = "compression"

    def __init__(
        self,
        pruning_ratio: Optional[float] = 0.5,
        target_macs_ratio: Optional[float] = None,
        target_speedup: Optional[float] = None,
        importance: ImportanceName = "group_magnitude",
        global_pruning: bool = False,
        schedule: Schedule = "cubic",
        start_epoch: int = 1,
        end_epoch: Optional[int] = None,
        frequency: int = 1,
        ignored_layers: Optional[list[str]] = None,
        round_to: Optional[int] = None,
        max_pruning_ratio: float = 0.95,
        sparsity_regularization: float = 0.0,
        example_input: Any = None,
        batch_keys: Optional[dict[str, Key]] = None,
        measure_latency: bool = True,
        evaluate: bool = True,
        customized_pruners: Optional[dict[Any, Any]] = None,
    ) -> None:
        super().__init__()
        if target_macs_ratio is not None and target_speedup is not None:
            raise ValueError("Set `target_macs_ratio` or `target_speedup`, not both (target_speedup = 1 / macs ratio).")
        if target_speedup is not None:
            if target_speedup <= 1.0:
                raise ValueError(f"`target_speedup` must be > 1 (a MACs ratio dense/pruned), got {target_speedup}.")
            target_macs_ratio = 1.0 / target_speedup
        if target_macs_ratio is not None:
            if not 0.0 < target_macs_ratio < 1.0:
                raise ValueError(f"`target_macs_ratio` must be in (0, 1) (pruned MACs / dense MACs), got {target_macs_ratio}.")
            pruning_ratio = None
        elif pruning_ratio is None:
            raise ValueError("Set one of `pruning_ratio`, `target_macs_ratio` or `target_speedup`.")
        elif not 0.0 <= pruning_ratio < 1.0:
            raise ValueError(f"`pruning_ratio` must be in [0, 1) (share of channels removed), got {pruning_ratio}.")
        if importance not in _IMPORTANCES:
            raise ValueError(f"`importance` must be one of {sorted(_IMPORTANCES)}, got {importance!r}.")
        if schedule not in ("cubic", "linear", "one_shot"):
            raise ValueError(f"`schedule` must be 'cubic', 'linear' or 'one_shot', got {schedule!r}.")
        if start_epoch < 0:
            raise ValueError(f"`start_epoch` must be >= 0, got {start_epoch}.")
        if end_epoch is not None and end_epoch < start_epoch:
            raise ValueError(f"`end_epoch` ({end_epoch}) must be >= `start_epoch` ({start_epoch}).")
        if frequency < 1:
            raise ValueError(f"`frequency` must be a positive number of epochs, got {frequency}.")
        if round_to is not None and round_to < 1:
            raise ValueError(f"`round_to` must be a positive integer, got {round_to}.")
        if not 0.0 < max_pruning_ratio < 1.0:
            raise ValueError(f"`max_pruning_ratio` must be in (0, 1), got {max_pruning_ratio}.")
        if pruning_ratio is not None and pruning_ratio > max_pruning_ratio:
            raise ValueError(f"`pruning_ratio` ({pruning_ratio}) exceeds `max_pruning_ratio` ({max_pruning_ratio}); raise the latter.")
        if sparsity_regularization < 0:
            raise ValueError(f"`sparsity_regularization` must be >= 0, got {sparsity_regularization}.")
        if ignored_layers is not None and not all(isinstance(n, str) for n in ignored_layers):
            raise TypeError(f"`ignored_layers` must be a list of module names (str), got {ignored_layers!r}.")
        self.pruning_ratio = pruning_ratio
        self.target_macs_ratio = target_macs_ratio
        self.importance = importance
        self.global_pruning = global_pruning
        self.schedule = schedule
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.frequency = frequency
        self.ignored_layers = list(ignored_layers or [])
        self.round_to = round_to
        self.max_pruning_ratio = max_pruning_ratio
        self.sparsity_regularization = sparsity_regularization
        self.example_input = example_from_spec(example_input)
        self.batch_keys = batch_keys
        self.measure_latency = measure_latency
        self.evaluate = evaluate
        self.customized_pruners = customized_pruners

        self._contract: Optional[BatchContract] = None
        self._private = False  # a DifferentialPrivacy callback trains in the same fit
        self._pruner: Optional[tp.pruner.BasePruner] = None
        self._skeleton: Optional[nn.Module] = None  # the dense model, kept to un-prune for test(ckpt_path=...)
        self._ignored_resolved: Optional[list[str]] = None
        self._load_hook: Any = None
        # checkpointed state
        self._done = 0
        self._history: list[list[Any]] = []
        self._channel_ratio = 0.0
        self._example: Any = None
        self._latency_batch = 1
        self._init_scope: dict[str, int] = {}
        self._init_out: dict[str, int] = {}
        self._init_in: dict[str, int] = {}
        self._steps: list[dict[str, Any]] = []
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}
        self._figures: dict[str, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            pruning_ratio=self.pruning_ratio, target_macs_ratio=self.target_macs_ratio, schedule=self.schedule
        )

    # schedule --------------------------------------------------------------------------------
    def events(self, max_epochs: Optional[int] = None) -> list[int]:
        """Epochs with a pruning step."""
        if self.schedule == "one_shot":
            return [self.start_epoch]
        end = self.end_epoch
        if end is None:
            if max_epochs is None or max_epochs < 1:
                raise ValueError("Set `end_epoch` when the Trainer has no `max_epochs`.")
            end = max(self.start_epoch, max_epochs // 2)
        return list(range(self.start_epoch, end + 1, self.frequency))

    def targets(self, max_epochs: Optional[int] = None) -> list[float]:
        """Per step: the channel ratio (``pruning_ratio`` mode) or the share of MACs removed (MACs mode)."""
        final = self.pruning_ratio if self.pruning_ratio is not None else 1.0 - float(self.target_macs_ratio)
        return pruning_schedule(self.schedule, final, len(self.events(max_epochs)))

    # lifecycle -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._contract = BatchContract.resolve(self.batch_keys, trainer)
        self._private = find_callback(trainer, DifferentialPrivacy) is not None
        if stage == "fit":
            if self._private and self.sparsity_regularization > 0:
                raise ValueError(
                    f"ProgressivePruning(sparsity_regularization={self.sparsity_regularization}) cannot train with "
                    "DifferentialPrivacy: the DP optimizer replaces each gradient by its clipped, noised per-sample sum, "
                    "so the regularizer's gradient would be silently dropped. Set `sparsity_regularization: 0` (pruning "
                    "by importance works under DP)."
                )
            events = self.events(trainer.max_epochs)
            unfinished = trainer.max_epochs is not None and trainer.max_epochs > 0 and events[-1] >= trainer.max_epochs
            if unfinished and trainer.fast_dev_run:
                rank_zero_info(f"fast_dev_run: ProgressivePruning's steps at epochs {events} are cut short.")
            elif unfinished:
                raise ValueError(
                    f"The pruning schedule's last step is at epoch {events[-1]}, but max_epochs={trainer.max_epochs}: "
                    f"the final ratio would never be reached. Lower `end_epoch`/`start_epoch` or raise `max_epochs`."
                )
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = on_checkpoint_load(trainer, pl_module, lambda ckpt: self._rebuild_for(pl_module, ckpt))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _rebuild_for(self, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> None:
        """Bring the module to the checkpoint's structure before Lightning loads its weights."""
        if CHECKPOINT_KEY not in checkpoint:
            return
        saved = [list(h) for h in checkpoint[CHECKPOINT_KEY]["history"]]
        if saved[: len(self._history)] != self._history:
            if self._skeleton is None:
                raise RuntimeError(
                    "The module is pruned differently from the checkpoint and its dense structure is unknown; "
                    "pass a freshly built model (or use `load_pruned_checkpoint`)."
                )
            _restore_dense(pl_module, self._skeleton)
            self._history = []
        restore_pruned_structure(pl_module, checkpoint, self.customized_pruners, applied=self._history)
        self._history = saved
        self._pruner = None  # traced on the old structure

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._example is None:
            inputs = self.example_input if self.example_input is not None else self._contract.inputs(batch)  # type: ignore[union-attr]
            self._example = example_from(inputs, private=self._private)
            first = inputs if isinstance(inputs, Tensor) else None
            self._latency_batch = int(first.shape[0]) if first is not None and first.ndim > 0 else 1
        if self._pruner is None and (self.sparsity_regularization > 0 or self._done < len(self.events(trainer.max_epochs))):
            self._pruner = self._build_pruner(trainer, pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sparsity_regularization > 0 and self._pruner is not None and self._done < len(self.events(trainer.max_epochs)):
            if isinstance(self._pruner, tp.pruner.BNScalePruner):
                self._pruner.regularize(pl_module, reg=self.sparsity_regularization)
            else:
                self._pruner.regularize(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        events = self.events(trainer.max_epochs)
        targets = self.targets(trainer.max_epochs)
        while self._done < len(events) and trainer.current_epoch >= events[self._done]:
            self._prune_event(trainer, pl_module, targets[self._done], events[self._done])
            self._done += 1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # what a loader needs before the weights, readable without the callback (load_pruned_checkpoint)
        checkpoint[CHECKPOINT_KEY] = {"history": copy.deepcopy(self._history), "example_input": self._example}

    def state_dict(self) -> dict[str, Any]:
        return {
            "done": self._done,
            "history": copy.deepcopy(self._history),
            "channel_ratio": self._channel_ratio,
            "example_input": self._example,
            "latency_batch": self._latency_batch,
            "init_scope": dict(self._init_scope),
            "init_out": dict(self._init_out),
            "init_in": dict(self._init_in),
            "steps": copy.deepcopy(self._steps),
            "before": dict(self._before),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = int(state_dict["done"])
        self._history = [list(h) for h in state_dict["history"]]
        self._channel_ratio = float(state_dict["channel_ratio"])
        self._example = state_dict["example_input"]
        self._latency_batch = int(state_dict["latency_batch"])
        self._init_scope = dict(state_dict["init_scope"])
        self._init_out = dict(state_dict["init_out"])
        self._init_in = dict(state_dict["init_in"])
        self._steps = list(state_dict["steps"])
        self._before = dict(state_dict["before"])
        self._pruner = None

    # pruner ----------------------------------------------------------------------------------
    def _resolve_ignored(self, pl_module: nn.Module, example: Any) -> list[str]:
        if self._ignored_resolved is None:
            names = dict(pl_module.named_modules())
            unknown = [n for n in self.ignored_layers if n not in names]
            if unknown:
                raise ValueError(
                    f"`ignored_layers` names {unknown} that are not modules of {type(pl_module).__name__}; "
                    f"its modules are: {[n for n in names if n]}."
                )
            self._ignored_resolved = list(dict.fromkeys(output_layers(pl_module, example) + self.ignored_layers))
        return self._ignored_resolved

    def _build_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tp.pruner.BasePruner:
        # tracing runs forward/backward passes that must leave no trace on training (DP hooks, RNG, modes)
        with isolated_eval(pl_module, trainer, grad=True):
            return self._trace_pruner(pl_module)

    def _trace_pruner(self, pl_module: pl.LightningModule) -> tp.pruner.BasePruner:
        example = self._device_example(pl_module)
        try:
            pl_module(example)
        except Exception as err:
            raise _trace_error(pl_module, example, err) from err
        ignored = self._resolve_ignored(pl_module, example)
        self._check_pruners(pl_module, example, ignored)
        modules = dict(pl_module.named_modules())
        kwargs: dict[str, Any] = {}
        pruner_cls: type = tp.pruner.BasePruner
        if self.sparsity_regularization > 0:
            pruner_cls = tp.pruner.BNScalePruner if self.importance == "bn_scale" else tp.pruner.GroupNormPruner
            kwargs["reg"] = self.sparsity_regularization
        try:
            pruner = pruner_cls(
                pl_module,
                example,
                importance=_IMPORTANCES[self.importance](),
                global_pruning=self.global_pruning,
                pruning_ratio=0.0,
                max_pruning_ratio=self.max_pruning_ratio,
                iterative_steps=1,
                ignored_layers=[modules[n] for n in ignored],
                round_to=self.round_to,
                customized_pruners=self.customized_pruners,
                **kwargs,
            )
        except Exception as err:
            raise _trace_error(pl_module, example, err) from err
        # the schedule's ratios are relative to the dense model: after a resume the pruner is traced on the
        # pruned model, so restore the dense channel counts it ranks against (torch-pruning keeps them per scope)
        names = {m: n for n, m in modules.items()}
        if self._init_scope:
            pruner._scope_initial_channels.update(self._init_scope)
            for module in list(pruner.layer_init_out_ch):
                name = names.get(module)
                if name in self._init_out:
                    pruner.layer_init_out_ch[module] = self._init_out[name]
                if name in self._init_in:
                    pruner.layer_init_in_ch[module] = self._init_in[name]
        else:
            self._init_out = {names[m]: int(c) for m, c in pruner.layer_init_out_ch.items() if c is not None and m in names}
            self._init_in = {names[m]: int(c) for m, c in pruner.layer_init_in_ch.items() if c is not None and m in names}
        return pruner

    def _check_pruners(self, pl_module: nn.Module, example: Any, ignored: list[str]) -> None:
        """Refuse a layer with weights that torch-pruning has no pruner for.

        torch-pruning would treat its weights as "unwrapped parameters" and guess the channel
        dimension (the last non-singleton one): a wrong guess breaks shapes or silently prunes the
        wrong axis. Only layers that run in the forward pass are checked.
        """
        ignored_modules = {m for n in ignored for m in pl_module.get_submodule(n).modules()}
        custom = tuple(t for t in (self.customized_pruners or {}) if isinstance(t, type))
        ran: list[nn.Module] = []
        handles = [m.register_forward_hook(lambda mod, i, o: ran.append(mod)) for m in pl_module.modules() if m is not pl_module]
        try:
            with torch.no_grad():
                pl_module(example)
        finally:
            for h in handles:
                h.remove()
        names = {m: n for n, m in pl_module.named_modules()}
        for module in dict.fromkeys(ran):
            if module in ignored_modules or next(module.parameters(recurse=False), None) is None:
                continue
            if isinstance(module, custom) or module in (self.customized_pruners or {}):
                continue
            if tp_ops.module2type(module) == tp_ops.OPTYPE.ELEMENTWISE:
                name = names.get(module, type(module).__name__)
                raise ValueError(
                    f"Layer {name!r} ({type(module).__name__}) has parameters but torch-pruning has no pruner for it "
                    f"(it would guess which dimension is the channel). Add it to `ignored_layers: [{name!r}]`, or pass "
                    f"`customized_pruners={{{type(module).__name__}: MyPruner()}}` (a `tp.pruner.BasePruningFunc`)."
                )

    def _device_example(self, pl_module: nn.Module) -> Any:
        device = next(iter(pl_module.parameters()), torch.empty(0)).device
        return map_tensors(self._example, lambda t: t.to(device))

    # one pruning step ------------------------------------------------------------------------
    def _prune_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float, epoch: int) -> None:
        if self._pruner is None:
            self._pruner = self._build_pruner(trainer, pl_module)
        example = self._device_example(pl_module)
        if not self._before:
            self._measure_before(trainer, pl_module, example)
        if self.importance in _GRADIENT_IMPORTANCES and not any(p.grad is not None for p in pl_module.parameters()):
            raise RuntimeError(
                f"importance={self.importance!r} needs gradients, but no parameter has `.grad` after the training "
                "batch (manual optimization that zeroes them?). Use importance='group_magnitude' or keep the gradients."
            )
        old_params = dict(pl_module.named_parameters())
        ops: list[_Op] = []
        snapshots: dict[str, nn.Module] = {}
        history_len = len(self._pruner.DG.pruning_history())
        # same decisions on every rank (random importance), without touching the training RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1_000_003 * (self._done + 1))
            if self.target_macs_ratio is None:
                self._step_to(pl_module, target, ops, snapshots)
                self._channel_ratio = target
            else:
                goal = self._before["macs"] * (1.0 - target)
                macs, _ = count_macs_params(pl_module, example)
                while macs > goal and self._channel_ratio < self.max_pruning_ratio - 1e-9:
                    ratio = min(self._channel_ratio + _MACS_SEARCH_STEP, self.max_pruning_ratio)
                    self._step_to(pl_module, ratio, ops, snapshots)
                    self._channel_ratio = ratio
                    macs, _ = count_macs_params(pl_module, example)
        self._init_scope = {str(k): int(v) for k, v in self._pruner._scope_initial_channels.items()}
        for name, is_out, idxs in self._pruner.DG.pruning_history()[history_len:]:
            self._history.append([name, bool(is_out), _plain(idxs)])
        self._carry_optimizer_state(trainer, pl_module, old_params, ops, snapshots)
        rewrap_ddp(trainer)
        self._pruner.update_regularizer()  # regularizing pruners cache the groups of the old structure
        macs, params = count_macs_params(pl_module, example)
        step = {
            "epoch": epoch,
            "step": trainer.global_step,
            "target": float(target),
            "channel_ratio": float(self._channel_ratio),
            "params": params,
            "macs": macs,
            "param_ratio": params / self._before["params"],
            "macs_ratio": macs / self._before["macs"],
        }
        self._steps.append(step)
        metrics = {"compression/params": float(params), "compression/macs": float(macs),
                   "compression/channel_ratio": float(self._channel_ratio), "compression/macs_ratio": step["macs_ratio"]}  # fmt: skip
        if trainer.is_global_zero:  # once per pruning step, straight to the loggers (not every n steps)
            for logger in getattr(trainer, "loggers", None) or []:
                logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"ProgressivePruning step {self._done + 1} (epoch {epoch}): channel ratio {self._channel_ratio:.3f}, "
            f"params {params:,} ({step['param_ratio']:.1%}), MACs {macs:,.0f} ({step['macs_ratio']:.1%})"
        )

    def _step_to(self, pl_module: nn.Module, ratio: float, ops: list[_Op], snapshots: dict[str, nn.Module]) -> None:
        pruner = self._pruner
        assert pruner is not None
        # torch-pruning reads the ratio of its current step from `per_step_pruning_ratio`; the callback owns the
        # schedule (epochs, resume, MACs targets), so it sets the one ratio of the step it runs now
        step = pruner.current_step
        pruner.iterative_steps = step + 1
        pruner.per_step_pruning_ratio = [float(ratio)] * (step + 2)
        pruner.per_step_head_pruning_ratio = [0.0] * (step + 2)
        if self.importance == "hessian":
            pruner.importance.zero_grad()
            pruner.importance.accumulate_grad(pl_module)
        graph = pruner.DG
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                target = dep.target
                if target.type == tp_ops.OPTYPE.PARAMETER:
                    ops.append(_Op(graph._param_to_name[target.module], dep.handler, target.pruning_dim, _plain(idxs), True))
                    continue
                name = graph._module2name.get(target.module)
                if name is None:  # a functional op (relu, add, flatten...): nothing to carry
                    continue
                if name not in snapshots and next(target.module.parameters(recurse=False), None) is not None:
                    snapshots[name] = copy.deepcopy(target.module)
                ops.append(_Op(name, dep.handler, target.pruning_dim, _plain(idxs)))
            group.prune()

    @staticmethod
    def _carry_optimizer_state(
        trainer: pl.Trainer, pl_module: nn.Module, old_params: dict[str, nn.Parameter], ops: list[_Op], snapshots: dict[str, nn.Module]
    ) -> None:
        """Point the optimizers at the new parameters and prune their state like the weights.

        Each state tensor shaped like its parameter (momentum, Adam moments) is put into a copy of
        the layer as it was before the step, and the step's pruning operations are replayed on that
        copy: the kept channels keep their state, exactly as the weights do.
        """
        new_params = dict(pl_module.named_parameters())
        name_of = {id(p): n for n, p in old_params.items()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [new_params.get(name_of.get(id(p), ""), p) for p in group["params"]]
            for module_name, snapshot in snapshots.items():
                prefix = f"{module_name}." if module_name else ""
                local = {pn: old_params.get(prefix + pn) for pn, _ in snapshot.named_parameters(recurse=False)}
                states = {pn: optimizer.state.get(p) for pn, p in local.items() if p is not None}
                if not any(states.values()):
                    continue
                keys = {k for pn, st in states.items() if st for k, v in st.items()
                        if isinstance(v, Tensor) and v.shape == local[pn].shape}  # fmt: skip
                new_states = {pn: {k: v for k, v in st.items() if k not in keys} for pn, st in states.items() if st}
                for key in keys:
                    shadow = copy.deepcopy(snapshot)
                    with torch.no_grad():
                        for pn, param in shadow.named_parameters(recurse=False):
                            param.grad = None
                            st = states.get(pn)
                            if st and key in st:
                                param.data = st[key].detach().clone().to(param.dtype)
                        for op in ops:
                            if op.name == module_name and not op.is_param:
                                op.handler.__self__.pruning_dim = op.pruning_dim
                                op.handler(shadow, op.idxs)
                    for pn, param in shadow.named_parameters(recurse=False):
                        st = states.get(pn)
                        if st and key in st:
                            new_states[pn][key] = param.data.to(st[key].dtype)
                for pn, st in new_states.items():
                    optimizer.state.pop(local[pn], None)
                    new_param = new_params.get(prefix + pn)
                    if new_param is not None:
                        optimizer.state[new_param] = st
            for op in ops:  # unwrapped nn.Parameters pruned directly
                if not op.is_param or op.name not in old_params:
                    continue
                old, new = old_params[op.name], new_params.get(op.name)
                st = optimizer.state.pop(old, None)
                if st and new is not None:
                    carried = {}
                    for k, v in st.items():
                        if isinstance(v, Tensor) and v.shape == old.shape:
                            op.handler.__self__.pruning_dim = op.pruning_dim
                            v = op.handler(nn.Parameter(v.detach().clone(), requires_grad=False), op.idxs).data
                        carried[k] = v
                    optimizer.state[new] = carried

    # measurements ----------------------------------------------------------------------------
    def _measure_before(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any) -> None:
        macs, params = count_macs_params(pl_module, example)
        self._before = {"params": params, "macs": macs, "epoch": trainer.current_epoch}
        if self.evaluate:
            self._before["accuracy"] = self._accuracy(trainer, pl_module)
        if self.measure_latency:
            self._skeleton = cpu_copy(pl_module)
            self._before["latency_s"] = measure_latency(self._skeleton, repeat_rows(self._example, self._latency_batch))
        elif self._skeleton is None:
            self._skeleton = cpu_copy(pl_module)

    def _accuracy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[float]:
        loaders = val_dataloaders(trainer)
        if not loaders or self._contract is None:
            return None
        with isolated_eval(pl_module, trainer):
            preds, target = collect_predictions({"m": pl_module}, loaders, self._contract, pl_module.device)
        if target.numel() == 0:
            return None
        return reduced_mean(trainer, (preds["m"] == target).float())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._before or self._example is None:
            return
        with plain_forward(pl_module):  # measure the pruned float model, not a QAT graph chained after it
            self._measure_after(trainer, pl_module)

    def _measure_after(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        example = self._device_example(pl_module)
        macs, params = count_macs_params(pl_module, example)
        after: dict[str, Any] = {"params": params, "macs": macs}
        if self.evaluate:
            after["accuracy"] = self._accuracy(trainer, pl_module)
        if self.measure_latency:
            batch = repeat_rows(self._example, self._latency_batch)
            pruned = cpu_copy(pl_module)
            after["latency_s"] = measure_latency(pruned, batch)
            if self._skeleton is not None:  # re-measure the dense model now, back to back, for a fair ratio
                self._before["latency_s"] = measure_latency(self._skeleton, batch)
        self._after = after
        folder = artifact_dir(trainer, "compression")  # on every rank: log_dir is a collective under DDP
        if trainer.is_global_zero:
            write_json(folder / "pruning.json", self.report())
            self._figures = {"pruning_curve": str(folder / "pruning_curve.png")}
            save_figure(trainer, self._figure(), folder / "pruning_curve.png", tag="compression/pruning_curve")

    def _figure(self) -> Any:
        fig = new_figure(figsize=(5.5, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        epochs = [self._before.get("epoch", 0)] + [s["epoch"] for s in self._steps]
        ax.step(epochs, [1.0] + [s["param_ratio"] for s in self._steps], where="post", marker="o", label="params")
        ax.step(epochs, [1.0] + [s["macs_ratio"] for s in self._steps], where="post", marker="s", label="MACs")
        ax.step(epochs, [0.0] + [s["channel_ratio"] for s in self._steps], where="post", ls="--", label="channels removed")
        ax.set_xlabel("epoch")
        ax.set_ylabel("share of dense model")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"ProgressivePruning ({self.schedule}, {self.importance})")
        ax.legend()
        return fig

    # report ----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        before, after = self._before, self._after or (
            {"params": self._steps[-1]["params"], "macs": self._steps[-1]["macs"]} if self._steps else {}
        )
        out: dict[str, Any] = {
            "method": "torch-pruning structural",
            "importance": self.importance,
            "schedule": self.schedule,
            "global_pruning": self.global_pruning,
            "channel_ratio": self._channel_ratio,
            "steps_done": self._done,
            "params_before": before.get("params"),
            "params_after": after.get("params"),
            "macs_before": before.get("macs"),
            "macs_after": after.get("macs"),
        }
        if before.get("params") and after.get("params"):
            out["param_ratio"] = after["params"] / before["params"]
            out["macs_ratio"] = after["macs"] / before["macs"]
        if before.get("latency_s") and after.get("latency_s"):
            out["latency_before_ms"] = before["latency_s"] * 1e3
            out["latency_after_ms"] = after["latency_s"] * 1e3
            out["speedup"] = before["latency_s"] / after["latency_s"]
        if "accuracy" in before:
            out["accuracy_before"] = before["accuracy"]
        if "accuracy" in after:
            out["accuracy_after"] = after["accuracy"]
        out["steps"] = copy.deepcopy(self._steps)
        if self._figures:
            out["figures"] = dict(self._figures)
        return out

