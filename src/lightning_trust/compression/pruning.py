"""Structural pruning during training with torch-pruning: channels and neurons are removed, so the
model really gets smaller and faster (Lightning's ``ModelPruning`` only masks weights).

This module is the callback. The schedule is in :mod:`~lightning_trust.compression.schedule`, the
pruned structure (tracing, recorded operations, replay on resume and loading) in
:mod:`~lightning_trust.compression.structure`, the optimizer state carried across a step in
:mod:`~lightning_trust.compression.optimizer_state`; MACs are counted by
:func:`lightning_trust.core.macs.count_macs_params`.

Example:
    >>> cb = ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=7, frequency=2)
    >>> cb.events(), [round(t, 3) for t in cb.targets()]
    ([1, 3, 5, 7], [0.289, 0.438, 0.492, 0.5])
    >>> sorted(ProgressivePruning(sparsity_regularization=1e-4).refuses) == [Capability.PER_SAMPLE_GRADIENTS]
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_trust.compression.checkpoints import on_checkpoint_load
from lightning_trust.compression.examples import (
    example_batch_size,
    example_from,
    example_from_spec,
    on_device,
    repeat_rows,
)
from lightning_trust.compression.export import plain_forward
from lightning_trust.compression.measure import collect_predictions, cpu_copy, measure_latency, reduced_mean
from lightning_trust.compression.optimizer_state import carry_optimizer_state
from lightning_trust.compression.schedule import SCHEDULES, Schedule, pruning_events, pruning_schedule
from lightning_trust.compression.structure import (
    CHECKPOINT_KEY,
    PruningOp,
    check_pruners,
    load_pruned_checkpoint,
    output_layers,
    plain_idxs,
    prune_groups,
    restore_dense,
    restore_pruned_structure,
    trace_error,
    traced_inputs,
)
from lightning_trust.core import artifact_dir, isolated_eval, new_figure, save_figure, write_json
from lightning_trust.core.batch import BatchContract, Key, call_module
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability, callbacks_with
from lightning_trust.core.loaders import split_loaders
from lightning_trust.core.macs import count_macs_params
from lightning_trust.core.seam import pruner_initial_channels, rewrap_ddp

__all__ = [
    "ImportanceName",
    "ProgressivePruning",
    "count_macs_params",
    "load_pruned_checkpoint",
    "output_layers",
    "pruning_schedule",
    "restore_pruned_structure",
]

ImportanceName = Literal["group_magnitude", "taylor", "lamp", "bn_scale", "hessian", "random"]

_IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "group_magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "hessian": lambda: tp.importance.GroupHessianImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}
_GRADIENT_IMPORTANCES = (tp.importance.GroupTaylorImportance, tp.importance.GroupHessianImportance)
#: Channel-ratio increment while pruning towards a MACs target.
_MACS_SEARCH_STEP = 0.02

_REGULARIZER_UNDER_DP = (
    "the DP optimizer replaces each gradient by its clipped, noised per-sample sum, so the regularizer's gradient "
    "would be silently dropped. Set `sparsity_regularization: 0` (pruning by importance works under DP)"
)


class ProgressivePruning(TrustCallback):
    """Prune channels/neurons progressively during ``fit`` with torch-pruning's DependencyGraph.

    Coupled layers (a conv's output channels, the next BatchNorm and the next layer's input
    channels) are removed together, so parameters, MACs and CPU latency really drop. Pruning steps
    happen after the first training batch of each scheduled epoch (so gradient importances see a
    real batch); the optimizers keep working on the new parameters with their state (momentum,
    Adam moments) carried over for the kept channels.

    Works in the same ``fit`` as a callback computing per-sample gradients
    (:class:`~lightning_trust.privacy.DifferentialPrivacy`): the DP callback re-attaches Opacus's
    per-sample-gradient hooks to the pruned layers, the DP optimizer keeps the pruned parameters,
    and the importances (weights, or the noised gradients) are post-processing of the private
    model, so ε is unchanged. Only ``sparsity_regularization`` is refused there.

    Args:
        pruning_ratio: final share of channels removed from each prunable layer (or globally with
            ``global_pruning``). Exclusive with ``target_macs_ratio``/``target_speedup``.
        target_macs_ratio: prune until the measured MACs are at most this share of the dense MACs.
        target_speedup: the same as ``target_macs_ratio = 1 / target_speedup`` (a MACs speedup; the
            measured CPU latency ratio is in the report).
        importance: channel importance (torch-pruning): ``"group_magnitude"``, ``"taylor"``,
            ``"lamp"``, ``"bn_scale"``, ``"hessian"`` or ``"random"``; or override :meth:`importance_for`.
        global_pruning: rank channels across layers instead of the same ratio per layer.
        schedule: ``"cubic"`` (Zhu & Gupta 2017), ``"linear"`` or ``"one_shot"``; or override :meth:`ratio_at`.
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
            batch's inputs (read through the batch contract); with a per-sample-gradient (DP)
            callback in the Trainer only their shapes (zeros), so no training record is stored in
            the checkpoint.
        batch_keys: where inputs/targets are in a batch (see :class:`~lightning_trust.core.batch.BatchContract`).
        measure_latency: measure dense vs pruned CPU latency for the report.
        evaluate: compute validation accuracy before the first step and at the end.
        customized_pruners: ``{layer type: tp.pruner.BasePruningFunc}`` for custom layers (Python only).
        name: the report section (default ``"compression"``).

    Policies: subclass and override :meth:`importance_for` (how channels are ranked) or
    :meth:`ratio_at` (how far the step at an epoch prunes)::

        class L1Exponential(ProgressivePruning):
            def importance_for(self, model):
                return tp.importance.GroupMagnitudeImportance(p=1)

            def ratio_at(self, epoch, max_epochs):
                return 0.5 * (1 - 0.5 ** (epoch - self.start_epoch + 1))

    Example:
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[ProgressivePruning(pruning_ratio=0.5, start_epoch=1,
        ...                                                                  end_epoch=4)])  # doctest: +SKIP
        >>> trainer.fit(SmallCNN(), DigitsDataModule())  # doctest: +SKIP
        >>> model = load_pruned_checkpoint(SmallCNN, trainer.checkpoint_callback.last_model_path)  # doctest: +SKIP
    """

    report_section = "compression"
    logged_keys: ClassVar[dict[str, str]] = {
        "compression/params": "parameters after a pruning step",
        "compression/macs": "MACs of one sample after a pruning step",
        "compression/channel_ratio": "share of channels removed after a pruning step",
        "compression/macs_ratio": "MACs after a pruning step / dense MACs",
    }
    report_keys: ClassVar[dict[str, str]] = {
        "method": "the pruning method (torch-pruning structural)",
        "importance": "the channel importance",
        "schedule": "the pruning schedule",
        "global_pruning": "whether channels were ranked across layers",
        "channel_ratio": "share of channels removed at the end",
        "steps_done": "pruning steps done",
        "params_before": "parameters of the dense model",
        "params_after": "parameters of the pruned model",
        "macs_before": "MACs of one sample, dense model",
        "macs_after": "MACs of one sample, pruned model",
        "param_ratio": "params_after / params_before",
        "macs_ratio": "macs_after / macs_before",
        "latency_before_ms": "median CPU latency of the dense model per batch",
        "latency_after_ms": "median CPU latency of the pruned model per batch",
        "speedup": "dense latency / pruned latency",
        "accuracy_before": "validation accuracy before the first pruning step",
        "accuracy_after": "validation accuracy at the end of fit",
        "steps": "per pruning step: epoch, step, target, channel ratio, params, MACs and their ratios",
    }

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
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        pruning_ratio, target_macs_ratio = _validate(
            pruning_ratio, target_macs_ratio, target_speedup, importance, schedule, start_epoch, end_epoch, frequency,
            round_to, max_pruning_ratio, sparsity_regularization, ignored_layers,
        )  # fmt: skip
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
        self._private = False  # a per-sample-gradient (DP) callback trains in the same fit
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

    # declarations ----------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[Capability]:  # type: ignore[override]
        """Changes the parameters; runs extra passes (tracing, MACs, accuracy, latency); with a
        sparsity regularizer it also edits the gradients."""
        found = {Capability.CHANGES_PARAMETERS, Capability.EXTRA_PASSES}
        if self.sparsity_regularization > 0:
            found.add(Capability.EDITS_GRADIENTS)
        return frozenset(found)

    @property
    def refuses(self) -> Mapping[Capability, str]:  # type: ignore[override]
        """Per-sample gradients (DP-SGD), only with a sparsity regularizer (whose gradient DP would drop)."""
        if self.sparsity_regularization > 0:
            reason = f"with sparsity_regularization={self.sparsity_regularization} {_REGULARIZER_UNDER_DP}"
            return {Capability.PER_SAMPLE_GRADIENTS: reason}
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            pruning_ratio=self.pruning_ratio, target_macs_ratio=self.target_macs_ratio, schedule=self.schedule
        )

    # policies --------------------------------------------------------------------------------
    def importance_for(self, model: nn.Module) -> tp.importance.Importance:
        """The torch-pruning importance that ranks the channels of ``model`` (called each time the
        pruner is traced). Default: the one named by ``importance``. Override to rank your own way
        (a gradient importance such as ``GroupTaylorImportance`` needs the batch's gradients)."""
        return _IMPORTANCES[self.importance]()

    def ratio_at(self, epoch: int, max_epochs: Optional[int] = None) -> float:
        """The target of the pruning step at ``epoch``: the share of channels removed
        (``pruning_ratio``), or of dense MACs removed (``target_macs_ratio``), after that step;
        0 before the first step. Default: ``schedule`` over :meth:`events`. An override should
        not decrease from one step to the next (pruned channels do not come back)."""
        events = self.events(max_epochs)
        reached = [i for i, event in enumerate(events) if event <= epoch]
        if not reached:
            return 0.0
        final = self.pruning_ratio if self.pruning_ratio is not None else 1.0 - float(self.target_macs_ratio or 0.0)
        return pruning_schedule(self.schedule, final, len(events))[reached[-1]]

    # schedule --------------------------------------------------------------------------------
    def events(self, max_epochs: Optional[int] = None) -> list[int]:
        """Epochs with a pruning step."""
        return pruning_events(self.schedule, self.start_epoch, self.end_epoch, self.frequency, max_epochs)

    def targets(self, max_epochs: Optional[int] = None) -> list[float]:
        """Per step: the channel ratio (``pruning_ratio`` mode) or the share of MACs removed (MACs mode)."""
        return [self.ratio_at(epoch, max_epochs) for epoch in self.events(max_epochs)]

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """Nothing left to do in the training hooks: every scheduled step is done."""
        return self._done >= len(self.events(trainer.max_epochs))

    # lifecycle -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._contract = BatchContract.resolve(self.batch_keys, trainer)
        self._private = bool(callbacks_with(trainer, Capability.PER_SAMPLE_GRADIENTS))
        if stage == TrainerFn.FITTING:
            self._check_schedule_fits(trainer)
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = on_checkpoint_load(trainer, pl_module, lambda ckpt: self._rebuild_for(pl_module, ckpt))

    def _check_schedule_fits(self, trainer: pl.Trainer) -> None:
        events = self.events(trainer.max_epochs)
        unfinished = trainer.max_epochs is not None and trainer.max_epochs > 0 and events[-1] >= trainer.max_epochs
        if unfinished and getattr(trainer, "fast_dev_run", False):
            rank_zero_info(f"fast_dev_run: ProgressivePruning's steps at epochs {events} are cut short.")
        elif unfinished:
            raise ValueError(
                f"The pruning schedule's last step is at epoch {events[-1]}, but max_epochs={trainer.max_epochs}: "
                f"the final ratio would never be reached. Lower `end_epoch`/`start_epoch` or raise `max_epochs`."
            )

    @override
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
            restore_dense(pl_module, self._skeleton)
            self._history = []
        restore_pruned_structure(pl_module, checkpoint, self.customized_pruners, applied=self._history)
        self._history = saved
        self._pruner = None  # traced on the old structure

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example is None:
            self._keep_example(batch)
        if self._pruner is None and not self._should_skip(trainer):
            self._pruner = self._build_pruner(trainer, pl_module)

    def _keep_example(self, batch: Any) -> None:
        inputs = self.example_input if self.example_input is not None else self._contract.inputs(batch)  # type: ignore[union-attr]
        self._example = example_from(inputs, private=self._private)
        self._latency_batch = example_batch_size(inputs, tensor_only=True)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sparsity_regularization == 0 or self._pruner is None or self._should_skip(trainer):
            return
        if isinstance(self._pruner, tp.pruner.BNScalePruner):
            self._pruner.regularize(pl_module, reg=self.sparsity_regularization)
        else:
            self._pruner.regularize(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        events = self.events(trainer.max_epochs)
        while not self._should_skip(trainer) and trainer.current_epoch >= events[self._done]:
            epoch = events[self._done]
            self._prune_event(trainer, pl_module, self.ratio_at(epoch, trainer.max_epochs), epoch)
            self._done += 1

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # what a loader needs before the weights, readable without the callback (load_pruned_checkpoint)
        checkpoint[CHECKPOINT_KEY] = {"history": copy.deepcopy(self._history), "example_input": self._example}

    @override
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

    @override
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

    def _build_pruner(self, trainer: Any, pl_module: nn.Module) -> tp.pruner.BasePruner:
        # tracing runs forward/backward passes that must leave no trace on training (DP hooks, RNG, modes)
        with isolated_eval(pl_module, trainer, grad=True):
            return self._trace_pruner(pl_module)

    def _trace_pruner(self, pl_module: nn.Module) -> tp.pruner.BasePruner:
        example = on_device(self._example, pl_module)
        try:
            call_module(pl_module, example)
        except Exception as err:  # any failure of the user's forward on the example
            raise trace_error(pl_module, example, err) from err
        ignored = self._resolve_ignored(pl_module, example)
        check_pruners(pl_module, example, ignored, self.customized_pruners)
        modules = dict(pl_module.named_modules())
        importance = self.importance_for(pl_module)
        kwargs: dict[str, Any] = {}
        pruner_cls: type = tp.pruner.BasePruner
        if self.sparsity_regularization > 0:
            bn_scale = isinstance(importance, tp.importance.BNScaleImportance)
            pruner_cls = tp.pruner.BNScalePruner if bn_scale else tp.pruner.GroupNormPruner
            kwargs["reg"] = self.sparsity_regularization
        try:
            pruner = pruner_cls(
                pl_module,
                traced_inputs(example),
                importance=importance,
                global_pruning=self.global_pruning,
                pruning_ratio=0.0,
                max_pruning_ratio=self.max_pruning_ratio,
                iterative_steps=1,
                ignored_layers=[modules[n] for n in ignored],
                round_to=self.round_to,
                customized_pruners=self.customized_pruners,
                **kwargs,
            )
        except Exception as err:  # tracing failures surface as many exception types
            raise trace_error(pl_module, example, err) from err
        self._keep_dense_counts(pruner, {m: n for n, m in modules.items()})
        return pruner

    def _keep_dense_counts(self, pruner: tp.pruner.BasePruner, names: Mapping[nn.Module, str]) -> None:
        """The schedule's ratios are relative to the dense model: after a resume the pruner is traced
        on the pruned model, so restore the dense channel counts it ranks against."""
        if self._init_scope:
            pruner_initial_channels(pruner).update(self._init_scope)
            for module in list(pruner.layer_init_out_ch):
                name = names.get(module)
                if name in self._init_out:
                    pruner.layer_init_out_ch[module] = self._init_out[name]
                if name in self._init_in:
                    pruner.layer_init_in_ch[module] = self._init_in[name]
        else:
            self._init_out = {
                names[m]: int(c) for m, c in pruner.layer_init_out_ch.items() if c is not None and m in names
            }
            self._init_in = {
                names[m]: int(c) for m, c in pruner.layer_init_in_ch.items() if c is not None and m in names
            }

    # one pruning step ------------------------------------------------------------------------
    def _prune_event(self, trainer: Any, pl_module: nn.Module, target: float, epoch: int) -> None:
        if self._pruner is None:
            self._pruner = self._build_pruner(trainer, pl_module)
        pruner = self._pruner
        example = on_device(self._example, pl_module)
        if not self._before:
            self._measure_before(trainer, pl_module, example)
        if isinstance(pruner.importance, _GRADIENT_IMPORTANCES) and not any(
            p.grad is not None for p in pl_module.parameters()
        ):
            raise RuntimeError(
                f"importance={self.importance!r} needs gradients, but no parameter has `.grad` after the training "
                "batch (manual optimization that zeroes them?). Use importance='group_magnitude' or keep the gradients."
            )
        old_params = dict(pl_module.named_parameters())
        ops: list[PruningOp] = []
        snapshots: dict[str, nn.Module] = {}
        history_len = len(pruner.DG.pruning_history())
        # same decisions on every rank (random importance), without touching the training RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1_000_003 * (self._done + 1))
            if self.target_macs_ratio is None:
                self._step_to(pl_module, target, ops, snapshots)
                self._channel_ratio = target
            else:
                self._step_to_macs(pl_module, example, target, ops, snapshots)
        self._init_scope = {str(k): int(v) for k, v in pruner_initial_channels(pruner).items()}
        for layer, is_out, idxs in pruner.DG.pruning_history()[history_len:]:
            self._history.append([layer, bool(is_out), plain_idxs(idxs)])
        carry_optimizer_state(trainer.optimizers, old_params, dict(pl_module.named_parameters()), ops, snapshots)
        rewrap_ddp(trainer)
        pruner.update_regularizer()  # regularizing pruners cache the groups of the old structure
        self._record_step(trainer, pl_module, example, target, epoch)

    def _step_to_macs(
        self, pl_module: nn.Module, example: Any, target: float, ops: list[PruningOp], snapshots: dict[str, nn.Module]
    ) -> None:
        """Raise the channel ratio in small steps until the measured MACs reach ``1 - target`` of dense."""
        goal = self._before["macs"] * (1.0 - target)
        macs, _ = count_macs_params(pl_module, example)
        while macs > goal and self._channel_ratio < self.max_pruning_ratio - 1e-9:
            ratio = min(self._channel_ratio + _MACS_SEARCH_STEP, self.max_pruning_ratio)
            self._step_to(pl_module, ratio, ops, snapshots)
            self._channel_ratio = ratio
            macs, _ = count_macs_params(pl_module, example)

    def _step_to(
        self, pl_module: nn.Module, ratio: float, ops: list[PruningOp], snapshots: dict[str, nn.Module]
    ) -> None:
        pruner = self._pruner
        assert pruner is not None
        # torch-pruning reads the ratio of its current step from `per_step_pruning_ratio`; the callback owns the
        # schedule (epochs, resume, MACs targets), so it sets the one ratio of the step it runs now
        step = pruner.current_step
        pruner.iterative_steps = step + 1
        pruner.per_step_pruning_ratio = [float(ratio)] * (step + 2)
        pruner.per_step_head_pruning_ratio = [0.0] * (step + 2)
        if isinstance(pruner.importance, tp.importance.GroupHessianImportance):
            pruner.importance.zero_grad()
            pruner.importance.accumulate_grad(pl_module)
        prune_groups(pruner.DG, pruner.step(interactive=True), ops, snapshots)

    def _record_step(self, trainer: Any, pl_module: nn.Module, example: Any, target: float, epoch: int) -> None:
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

    # measurements ----------------------------------------------------------------------------
    def _measure_before(self, trainer: Any, pl_module: nn.Module, example: Any) -> None:
        macs, params = count_macs_params(pl_module, example)
        self._before = {"params": params, "macs": macs, "epoch": trainer.current_epoch}
        if self.evaluate:
            self._before["accuracy"] = self._accuracy(trainer, pl_module)
        self._skeleton = cpu_copy(pl_module)
        if self.measure_latency:
            self._before["latency_s"] = measure_latency(self._skeleton, repeat_rows(self._example, self._latency_batch))

    def _accuracy(self, trainer: Any, pl_module: nn.Module) -> Optional[float]:
        loaders = split_loaders(trainer, "val")
        if not loaders or self._contract is None:
            return None
        device = next(iter(pl_module.parameters()), torch.empty(0)).device
        with isolated_eval(pl_module, trainer):
            preds, target = collect_predictions({"m": pl_module}, loaders, self._contract, device)
        if target.numel() == 0:
            return None
        return reduced_mean(trainer, (preds["m"] == target).float())

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._before or self._example is None:
            return
        with plain_forward(pl_module):  # measure the pruned float model, not a QAT graph chained after it
            self._measure_after(trainer, pl_module)

    def _measure_after(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        macs, params = count_macs_params(pl_module, on_device(self._example, pl_module))
        after: dict[str, Any] = {"params": params, "macs": macs}
        if self.evaluate:
            after["accuracy"] = self._accuracy(trainer, pl_module)
        if self.measure_latency:
            batch = repeat_rows(self._example, self._latency_batch)
            after["latency_s"] = measure_latency(cpu_copy(pl_module), batch)
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
        ax.step(
            epochs, [0.0] + [s["channel_ratio"] for s in self._steps], where="post", ls="--", label="channels removed"
        )
        ax.set_xlabel("epoch")
        ax.set_ylabel("share of dense model")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"ProgressivePruning ({self.schedule}, {self.importance})")
        ax.legend()
        return fig

    # report ----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The schedule, the measured shapes, MACs, latency and accuracy (see :attr:`report_keys`)."""
        before, after = (
            self._before,
            self._after
            or ({"params": self._steps[-1]["params"], "macs": self._steps[-1]["macs"]} if self._steps else {}),
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


def _validate(
    pruning_ratio: Optional[float],
    target_macs_ratio: Optional[float],
    target_speedup: Optional[float],
    importance: str,
    schedule: str,
    start_epoch: int,
    end_epoch: Optional[int],
    frequency: int,
    round_to: Optional[int],
    max_pruning_ratio: float,
    sparsity_regularization: float,
    ignored_layers: Optional[list[str]],
) -> tuple[Optional[float], Optional[float]]:
    """Refuse bad arguments early; returns ``(pruning_ratio, target_macs_ratio)``, one of them ``None``."""
    if target_macs_ratio is not None and target_speedup is not None:
        raise ValueError("Set `target_macs_ratio` or `target_speedup`, not both (target_speedup = 1 / macs ratio).")
    if target_speedup is not None:
        if target_speedup <= 1.0:
            raise ValueError(f"`target_speedup` must be > 1 (a MACs ratio dense/pruned), got {target_speedup}.")
        target_macs_ratio = 1.0 / target_speedup
    if target_macs_ratio is not None:
        if not 0.0 < target_macs_ratio < 1.0:
            raise ValueError(
                f"`target_macs_ratio` must be in (0, 1) (pruned MACs / dense MACs), got {target_macs_ratio}."
            )
        pruning_ratio = None
    elif pruning_ratio is None:
        raise ValueError("Set one of `pruning_ratio`, `target_macs_ratio` or `target_speedup`.")
    elif not 0.0 <= pruning_ratio < 1.0:
        raise ValueError(f"`pruning_ratio` must be in [0, 1) (share of channels removed), got {pruning_ratio}.")
    if importance not in _IMPORTANCES:
        raise ValueError(f"`importance` must be one of {sorted(_IMPORTANCES)}, got {importance!r}.")
    if schedule not in SCHEDULES:
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
        raise ValueError(
            f"`pruning_ratio` ({pruning_ratio}) exceeds `max_pruning_ratio` ({max_pruning_ratio}); raise the latter."
        )
    if sparsity_regularization < 0:
        raise ValueError(f"`sparsity_regularization` must be >= 0, got {sparsity_regularization}.")
    if ignored_layers is not None and not all(isinstance(n, str) for n in ignored_layers):
        raise TypeError(f"`ignored_layers` must be a list of module names (str), got {ignored_layers!r}.")
    return pruning_ratio, target_macs_ratio
