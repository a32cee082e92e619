"""The one seam to private internals of Lightning, torch, torch-pruning, fairlearn and MAPIE.

Every use of a private attribute in the pack goes through one small function here, with the
reason no public API serves. ``tests/core/test_seam.py`` exercises each against the installed
versions, so an upgrade that moves one of them fails there, in one place. The tested ranges are
pinned in ``pyproject.toml``.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> train_loader_owner(trainer) is None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource, _request_dataloader
from torch import nn

__all__ = [
    "adopt_tensors",
    "fairlearn_threshold_classes",
    "flat_outputs",
    "inductor_config",
    "loaded_checkpoint",
    "mapie_quantile",
    "pruner_initial_channels",
    "pruning_graph_names",
    "restore_train_loader",
    "rewrap_ddp",
    "state_key_of",
    "swap_train_loader",
    "thresholder_positive_probability",
    "train_loader_owner",
    "trained_epoch",
]

# Lightning ------------------------------------------------------------------------------------


class _SwappedTrainSource(_DataLoaderSource):
    """The fit loop's train-data source, giving ``wrap(user's loader)`` each time Lightning loads it."""

    def __init__(self, inner: _DataLoaderSource, owner: Any, wrap: Callable[[Any], Iterable[Any]]) -> None:
        super().__init__(inner.instance, inner.name)
        self.inner, self.owner, self.wrap = inner, owner, wrap

    def dataloader(self) -> Any:
        return self.wrap(_request_dataloader(self.inner))


def swap_train_loader(
    trainer: Any, owner: Any, wrap: Callable[[Any], Iterable[Any]], sharded: Optional[Callable[[Any], bool]] = None
) -> None:
    """Make the fit loop train on ``wrap(user's train loader)`` (DP's Poisson loader, a federated
    round's clients); undone by :func:`restore_train_loader`.

    Why private: Lightning has no public hook to replace the train dataloader of an unchanged
    module and datamodule; the fit loop reads it from ``fit_loop._data_source``, and a tuner may have
    built the combined loader already (``fit_loop._combined_loader``). ``sharded(loader)`` tells
    which loaders are distributed already, so Lightning injects no ``DistributedSampler`` into them
    (``trainer._data_connector._requires_distributed_sampler``).
    """
    fit_loop = trainer.fit_loop
    source = fit_loop._data_source
    if isinstance(source, _SwappedTrainSource):
        if source.owner is owner:
            return
        raise RuntimeError(
            f"{type(owner).__name__} cannot replace the train loader: {type(source.owner).__name__} already did. "
            "Use one callback that chooses the training batches."
        )
    fit_loop._data_source = _SwappedTrainSource(source, owner, wrap)
    fit_loop._combined_loader = None
    if sharded is not None:
        connector = trainer._data_connector
        original = connector._requires_distributed_sampler

        def requires_distributed_sampler(dataloader: Any) -> bool:
            return False if sharded(dataloader) else original(dataloader)

        connector._requires_distributed_sampler = requires_distributed_sampler


def restore_train_loader(trainer: Any, owner: Any) -> None:
    """Undo :func:`swap_train_loader` by ``owner`` (a no-op when it swapped nothing)."""
    fit_loop = trainer.fit_loop
    source = fit_loop._data_source
    if isinstance(source, _SwappedTrainSource) and source.owner is owner:
        fit_loop._data_source = source.inner
        trainer._data_connector.__dict__.pop("_requires_distributed_sampler", None)


def train_loader_owner(trainer: Any) -> Optional[Any]:
    """The callback whose :func:`swap_train_loader` is in place, or ``None``."""
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    return source.owner if isinstance(source, _SwappedTrainSource) else None


def rewrap_ddp(trainer: Any) -> None:
    """Re-wrap the module in DDP after its parameters or buffers were replaced.

    Why private: DDP builds its gradient buckets and buffer list when it wraps the module; after
    pruning (new ``Parameter`` objects) or after inserting fake-quant observers it must wrap again,
    or gradients of the new parameters are never all-reduced. Lightning's ``DDPStrategy`` wraps
    only in ``setup`` (``_setup_model``, then ``_register_ddp_hooks`` for comm hooks); no public
    method re-wraps.
    """
    from lightning.pytorch.strategies import DDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, nn.parallel.DistributedDataParallel):
        return
    module = strategy.lightning_module
    if module is None:
        return
    strategy.model = strategy._setup_model(module)
    strategy._register_ddp_hooks()


def loaded_checkpoint(trainer: Any) -> Optional[Mapping[str, Any]]:
    """The checkpoint dict the Trainer is restoring right now, or ``None``.

    Why private: a pruned or quantized structure must be rebuilt before Lightning copies the
    weights into the module, and Lightning restores the weights before any callback hook sees the
    checkpoint (``on_load_checkpoint`` comes after). ``trainer.ckpt_path`` is public but reading the
    file again would double the I/O of every resume; the dict Lightning has just read lives in
    ``trainer._checkpoint_connector._loaded_checkpoint``.
    """
    connector = getattr(trainer, "_checkpoint_connector", None)
    checkpoint = getattr(connector, "_loaded_checkpoint", None)
    return checkpoint or None


# torch ----------------------------------------------------------------------------------------


def adopt_tensors(module: nn.Module, source: nn.Module) -> None:
    """Make ``module`` hold ``source``'s parameter and buffer dicts (same objects, not copies).

    Why private: replaying a recorded pruning on resume starts from the dense shapes again, given
    to each module from a dense copy while hooks, optimizers and other callbacks keep references to
    the original module objects; ``nn.Module`` offers no public way to swap all parameters and
    buffers of a module in place (``_parameters`` and ``_buffers`` are the dicts
    ``named_parameters`` reads).
    """
    module._parameters = source._parameters
    module._buffers = source._buffers


def inductor_config() -> Any:
    """``torch._inductor.config``: the X86 Inductor settings the int8 compile needs (freezing).

    Why private: torch exposes Inductor's options only as this module; ``torch.compile(options=)``
    does not reach the settings read at lowering time.
    """
    import torch._inductor.config as config

    return config


# torch-pruning --------------------------------------------------------------------------------


def pruner_initial_channels(pruner: Any) -> dict[Any, int]:
    """The pruner's per-scope initial channel counts (mutable: update it to restore a resumed run).

    Why private: torch-pruning keeps the dense channel counts its ratio schedule is relative to in
    ``_scope_initial_channels`` and offers no getter or setter; a resumed run must restore them or
    later steps prune relative to the already pruned model.
    """
    return pruner._scope_initial_channels


def pruning_graph_names(graph: Any) -> tuple[Mapping[Any, str], Mapping[Any, str]]:
    """``(parameter -> name, module -> name)`` of a torch-pruning ``DependencyGraph``.

    Why private: recording which parameters a pruning step changed (to replay it on resume) needs
    the graph's own naming of parameters and modules, kept in ``_param_to_name`` and
    ``_module2name``; no public accessor returns them.
    """
    return graph._param_to_name, graph._module2name


# fairlearn ------------------------------------------------------------------------------------


def fairlearn_threshold_classes() -> tuple[type, type]:
    """``(InterpolatedThresholder, ThresholdOperation)`` from fairlearn's postprocessing.

    Why private: fairlearn's public ``ThresholdOptimizer`` can only be fitted, not rebuilt from
    thresholds it fitted earlier; restoring the fitted randomized thresholder from a checkpoint or
    a saved JSON needs the classes it is built from, which fairlearn keeps in private modules.
    """
    from fairlearn.postprocessing._interpolated_thresholder import InterpolatedThresholder
    from fairlearn.postprocessing._threshold_operation import ThresholdOperation

    return InterpolatedThresholder, ThresholdOperation


def thresholder_positive_probability(thresholder: Any, scores: Any, groups: Any) -> Any:
    """The probability of the positive decision under a fitted fairlearn thresholder.

    Why private: fairlearn's public ``predict`` samples the randomized decision; an exact
    evaluation (and a deterministic one for tests) needs ``_pmf_predict``.
    """
    import numpy as np

    return thresholder._pmf_predict(np.asarray(scores, dtype=float).reshape(-1, 1), sensitive_features=groups)[:, 1]


# MAPIE ----------------------------------------------------------------------------------------


def mapie_quantile(classifier: Any) -> float:
    """The conformal quantile a conformalized MAPIE ``SplitConformalClassifier`` thresholds its
    sets at (its first confidence level), once it has predicted a set.

    Why private: MAPIE 1.6's public classifier exposes the calibration ``conformity_scores`` but not
    the quantile of them it predicts with; for RAPS that is a quantile of the regularized scores
    (with the ``k_star`` and ``lambda_star`` it tunes on its own split), which no public value gives.
    MAPIE keeps it on ``_mapie_classifier.conformity_score_function_.quantiles_``.
    """
    import numpy as np

    function = classifier._mapie_classifier.conformity_score_function_
    return float(np.asarray(function.quantiles_).reshape(-1)[0])


def state_key_of(callback: Any, **identity: Any) -> str:
    """The checkpoint key of ``callback`` made from its class name and ``identity`` (the arguments that tell
    two instances of one class apart in a Trainer), as Lightning's own callbacks build theirs.

    Why private: a callback's ``state_key`` property is public, but the one way to build a key that matches
    Lightning's format (``ClassName{'k': v}``) is its protected ``Callback._generate_state_key``.
    """
    return str(callback._generate_state_key(**identity))


def trained_epoch(trainer: Any) -> int:
    """The 0-based index of the last training epoch that ran: the epoch whose weights a pass sees.

    During an epoch's validation this is ``trainer.current_epoch``; in ``on_fit_end`` and in a
    ``test`` after fit it is one less (``current_epoch`` counts completed epochs by then). Without a
    fit (a standalone ``validate``/``test``) it is ``current_epoch``.

    Why private: Lightning's public ``current_epoch`` is the number of completed epochs, which
    changes meaning between the last validation and ``on_fit_end``; only the fit loop's progress
    (``trainer.fit_loop.epoch_progress``, a private ``_Progress`` of the private ``_FitLoop``)
    counts the epochs started, whose last index is the epoch being (or last) trained.
    """
    current = int(getattr(trainer, "current_epoch", 0) or 0)
    progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
    started = getattr(getattr(progress, "current", None), "started", None)
    if not isinstance(started, int) or started <= 0:
        return current
    return started - 1


# torch.fx ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def flat_outputs(
    graph_module: torch.fx.GraphModule,
) -> Iterator[Callable[[torch.fx.GraphModule], torch.fx.GraphModule]]:
    """Inside, ``graph_module`` takes its flattened inputs and returns its flat outputs (no pytree
    rebuilding); on exit its own code generator (pytree in/out specs) is back. Yields a function
    that gives that code generator to another graph module built meanwhile (a pass's result).

    Why private: torchao's ``convert_pt2e`` constant-folds the graph with an ``fx.Interpreter``
    that feeds placeholder sentinels and then rebuilds the outputs with the graph's pytree spec; a
    Hugging Face ``DynamicCache`` in the outputs (GPT-2's ``past_key_values``) cannot be rebuilt
    from sentinels and the conversion crashes. ``Graph.set_codegen`` is public, but reading the
    graph's current code generator to put it back is only possible through ``Graph._codegen``.
    """
    graph = graph_module.graph
    original = graph._codegen
    graph.set_codegen(torch.fx.graph.CodeGen())
    graph_module.recompile()

    def restore(other: torch.fx.GraphModule) -> torch.fx.GraphModule:
        other.graph.set_codegen(original)
        other.recompile()
        return other

    try:
        yield restore
    finally:
        graph.set_codegen(original)
        graph_module.recompile()
