"""Structural pruning during training with torch-pruning: channels and neurons are removed, so the
model really gets smaller and faster (Lightning's ``ModelPruning`` only masks weights).

This module is the callback; the pieces it drives (schedule, pruner, structure, optimizer state,
measurements and report) are listed in :mod:`lightning_trust.compression`. MACs are counted by
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
from collections.abc import Mapping
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch_pruning as tp
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_trust.compression.checkpoints import callback_state, on_checkpoint_load
from lightning_trust.compression.distillation import Distillation
from lightning_trust.compression.examples import example_batch_size, example_from, example_from_spec, on_device
from lightning_trust.compression.export import plain_forward
from lightning_trust.compression.heads import Heads, find_heads, model_shapes
from lightning_trust.compression.keys import PRUNING_LOGGED_KEYS, PRUNING_REPORT_KEYS
from lightning_trust.compression.pruner import (
    IMPORTANCES,
    DenseCounts,
    ImportanceName,
    prune_step,
    regularize,
    trace_pruner,
)
from lightning_trust.compression.pruning_args import pruning_capabilities, pruning_refusals, validate_pruning_args
from lightning_trust.compression.pruning_checks import check_trial_step, measured_channel_ratio
from lightning_trust.compression.pruning_report import (
    measure_dense,
    measure_pruned,
    pruning_report,
    record_step,
    save_artifacts,
)
from lightning_trust.compression.schedule import (
    Schedule,
    check_schedule_fits,
    pruning_events,
    pruning_schedule,
    target_at,
)
from lightning_trust.compression.structure import (
    CHECKPOINT_KEY,
    load_pruned_checkpoint,
    output_layers,
    rebuild_for_checkpoint,
    restore_pruned_structure,
)
from lightning_trust.core import BatchContract, Capability, TrustCallback, callbacks_with, isolated_eval
from lightning_trust.core.batch import Key
from lightning_trust.core.macs import count_macs_params
from lightning_trust.core.seam import rewrap_ddp, state_key_of

__all__ = [
    "ImportanceName",
    "ProgressivePruning",
    "count_macs_params",
    "load_pruned_checkpoint",
    "output_layers",
    "pruning_schedule",
    "restore_pruned_structure",
]


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
        distill: a :class:`~lightning_trust.compression.distillation.Distillation` (or its arguments): the
            model before the first step is the teacher of the recovery epochs (KL on logits); off by default.
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
    logged_keys: ClassVar[dict[str, str]] = PRUNING_LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = PRUNING_REPORT_KEYS

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
        distill: Union[Distillation, Mapping[str, Any], None] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        pruning_ratio, target_macs_ratio = validate_pruning_args(
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
        self.distill = Distillation(**distill) if isinstance(distill, Mapping) else distill

        self._contract: Optional[BatchContract] = None
        self._private = False  # a per-sample-gradient (DP) callback trains in the same fit
        self._pruner: Optional[tp.pruner.BasePruner] = None
        self._heads = Heads()
        self._skeleton: Optional[nn.Module] = None  # the dense model, kept to un-prune for test(ckpt_path=...)
        self._ignored_resolved: Optional[list[str]] = None
        self._load_hook: Any = None
        # checkpointed state
        self._done = 0
        self._history: list[list[Any]] = []
        self._channel_ratio = 0.0
        self._example: Any = None
        self._latency_batch = 1
        self._dense = DenseCounts()
        self._steps: list[dict[str, Any]] = []
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}
        self._figures: dict[str, str] = {}

    # declarations ----------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[Capability]:  # type: ignore[override]
        """Changes the parameters; runs extra passes (tracing, MACs, accuracy, latency); with a
        sparsity regularizer it also edits the gradients."""
        return pruning_capabilities(self.sparsity_regularization)

    @property
    def refuses(self) -> Mapping[Capability, str]:  # type: ignore[override]
        """Per-sample gradients (DP-SGD), only with a sparsity regularizer (whose gradient DP would drop)."""
        return pruning_refusals(self.sparsity_regularization)

    @property
    def state_key(self) -> str:
        return state_key_of(
            self, pruning_ratio=self.pruning_ratio, target_macs_ratio=self.target_macs_ratio, schedule=self.schedule
        )

    # policies --------------------------------------------------------------------------------
    def importance_for(self, model: nn.Module) -> tp.importance.Importance:
        """The torch-pruning importance that ranks the channels of ``model`` (called each time the
        pruner is traced). Default: the one named by ``importance``. Override to rank your own way
        (a gradient importance such as ``GroupTaylorImportance`` needs the batch's gradients)."""
        return IMPORTANCES[self.importance]()

    def ratio_at(self, epoch: int, max_epochs: Optional[int] = None) -> float:
        """The target of the pruning step at ``epoch``: the share of channels removed
        (``pruning_ratio``), or of dense MACs removed (``target_macs_ratio``), after that step;
        0 before the first step. Default: ``schedule`` over :meth:`events`. An override should
        not decrease from one step to the next (pruned channels do not come back)."""
        final = self.pruning_ratio if self.pruning_ratio is not None else 1.0 - float(self.target_macs_ratio or 0.0)
        return target_at(self.schedule, final, self.events(max_epochs), epoch)

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
            check_schedule_fits(
                self.events(trainer.max_epochs), trainer.max_epochs, getattr(trainer, "fast_dev_run", False)
            )
        if self.distill is not None and stage == TrainerFn.FITTING:
            self.distill.patch(pl_module, self._contract)
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = on_checkpoint_load(trainer, pl_module, lambda ckpt: self._rebuild_for(pl_module, ckpt))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.distill is not None:
            self.distill.unpatch()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _rebuild_for(self, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> None:
        """Bring the module to the checkpoint's structure before Lightning loads its weights."""
        if self.distill is not None:  # the teacher is the dense model: copied before the module is pruned
            state = callback_state(checkpoint, type(self).__name__, self.state_key) or {}
            self.distill.restore(state.get("distillation"), self._skeleton if self._history else pl_module)
        saved = rebuild_for_checkpoint(pl_module, checkpoint, self._history, self._skeleton, self.customized_pruners)
        if saved is not None:
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
        if self.sparsity_regularization > 0 and self._pruner is not None and not self._should_skip(trainer):
            regularize(self._pruner, pl_module, self.sparsity_regularization)

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
            **self._dense.state_dict(),
            "steps": copy.deepcopy(self._steps),
            "before": dict(self._before),
            "distillation": None if self.distill is None else self.distill.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = int(state_dict["done"])
        self._history = [list(h) for h in state_dict["history"]]
        self._channel_ratio = float(state_dict["channel_ratio"])
        self._example = state_dict["example_input"]
        self._latency_batch = int(state_dict["latency_batch"])
        self._dense = DenseCounts.from_state(state_dict)
        self._steps = list(state_dict["steps"])
        self._before = dict(state_dict["before"])
        self._pruner = None

    # pruner ----------------------------------------------------------------------------------
    def _build_pruner(self, trainer: Any, pl_module: nn.Module) -> tp.pruner.BasePruner:
        # tracing runs forward/backward passes that must leave no trace on training (DP hooks, RNG, modes)
        with isolated_eval(pl_module, trainer, grad=True):
            pruner, self._ignored_resolved = trace_pruner(
                pl_module, on_device(self._example, pl_module), self.importance_for, self.ignored_layers,
                self._ignored_resolved, self.global_pruning, self.max_pruning_ratio, self.round_to,
                self.customized_pruners, self.sparsity_regularization,
            )  # fmt: skip
        self._dense.keep(pruner, pl_module)
        self._heads = find_heads(pl_module)
        if not self._history:  # before the first step: a pruning that breaks the forward is refused now
            with isolated_eval(pl_module, trainer, grad=True):
                final = min(
                    self.ratio_at(self.events(trainer.max_epochs)[-1], trainer.max_epochs), self.max_pruning_ratio
                )
                check_trial_step(
                    pl_module, self._example, self._ignored_resolved or [], final,
                    self.max_pruning_ratio, self.round_to, self.customized_pruners,
                )  # fmt: skip
        return pruner

    # one pruning step ------------------------------------------------------------------------
    def _prune_event(self, trainer: Any, pl_module: nn.Module, target: float, epoch: int) -> None:
        if self._pruner is None:
            self._pruner = self._build_pruner(trainer, pl_module)
        pruner = self._pruner
        if not self._before:
            self._measure_before(trainer, pl_module)
        if self.distill is not None:
            self.distill.keep_teacher(pl_module)  # the model before the first step teaches the recovery
        example = on_device(self._example, pl_module)
        goal = None if self.target_macs_ratio is None else self._before["macs"] * (1.0 - target)
        dense_heads = (self._before.get("shapes", {}).get("heads_per_layer") or [0])[0]
        self._channel_ratio, history = prune_step(
            pruner, pl_module, trainer.optimizers, example, target, self._channel_ratio, self.max_pruning_ratio, goal,
            seed=1_000_003 * (self._done + 1), importance=self.importance, heads=self._heads, dense_heads=dense_heads,
        )  # fmt: skip
        self._dense.after_step(pruner)
        self._history.extend(history)
        rewrap_ddp(trainer)
        pruner.update_regularizer()  # regularizing pruners cache the groups of the old structure
        ratio = measured_channel_ratio(pruner, self._dense.out, pl_module, self._ignored_resolved or [])
        number = self._done + 1
        self._steps.append(record_step(trainer, self._before, pl_module, example, target, ratio, epoch, number))

    # measurements ----------------------------------------------------------------------------
    def _measure_before(self, trainer: Any, pl_module: nn.Module) -> None:
        rows = self._latency_batch if self.measure_latency else None
        self._before, self._skeleton = measure_dense(
            trainer, pl_module, self._example, self._contract, self.evaluate, rows
        )
        if self._heads.attention:
            self._before["shapes"] = model_shapes(self._heads.attention, self._heads.mlp)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._before or self._example is None:
            return
        with plain_forward(pl_module):  # measure the pruned float model, not a QAT graph chained after it
            self._measure_after(trainer, pl_module)

    def _measure_after(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self._latency_batch if self.measure_latency else None
        self._after = measure_pruned(
            trainer, pl_module, self._example, self._contract, self.evaluate, rows, self._skeleton, self._before
        )
        heads = find_heads(pl_module)
        if heads.attention:
            self._after["shapes"] = model_shapes(heads.attention, heads.mlp)
        self._figures = save_artifacts(trainer, self.report(), self._before.get("epoch", 0))

    # report ----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The schedule, the measured shapes, MACs, latency and accuracy (see :attr:`report_keys`)."""
        measured = self._steps[-1]["channel_ratio"] if self._steps else 0.0
        report = pruning_report(
            self._before, self._after, self._steps, self.importance, self.schedule, self.global_pruning,
            measured, self._done, self._figures,
        )  # fmt: skip
        report["distillation"] = None if self.distill is None else self.distill.summary()
        return report
