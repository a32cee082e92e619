"""The torch-pruning pruner that :class:`~lightning_trust.compression.ProgressivePruning` drives:
the importances by name, building the pruner on a traced model, its dense channel counts, and
one pruning step (to a channel ratio, or in small steps to a MACs target).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> example = torch.randn(2, 4)
    >>> pruner, ignored = trace_pruner(model, example, lambda m: IMPORTANCES["group_magnitude"](), [])
    >>> ignored
    ['2']
    >>> step_pruner(pruner, model, 0.5, [], {})
    >>> model[0].out_features, model[2].in_features
    (4, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch_pruning as tp
from torch import nn

from lightning_trust.compression.heads import (
    Heads,
    find_heads,
    group_kind,
    head_ratio,
    hidden_ratio,
    num_heads_of,
    root_parameters,
)
from lightning_trust.compression.optimizer_state import carry_optimizer_state
from lightning_trust.compression.structure import (
    PruningOp,
    check_pruners,
    output_layers,
    plain_idxs,
    prune_groups,
    trace_error,
    traced_inputs,
)
from lightning_trust.core.batch import call_module
from lightning_trust.core.macs import count_macs_params
from lightning_trust.core.seam import pruner_initial_channels

__all__ = [
    "GRADIENT_IMPORTANCES",
    "IMPORTANCES",
    "MACS_SEARCH_STEP",
    "DenseCounts",
    "ImportanceName",
    "check_gradients",
    "dense_counts",
    "new_history",
    "prune_step",
    "regularize",
    "resolve_ignored",
    "restore_dense_counts",
    "step_pruner",
    "step_to_macs",
    "trace_forward",
    "trace_pruner",
]

ImportanceName = Literal["group_magnitude", "taylor", "lamp", "bn_scale", "hessian", "random"]

#: The channel importances by name (``importance=`` of the callback).
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "group_magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "hessian": lambda: tp.importance.GroupHessianImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}
#: Importances that rank channels by the batch's gradients.
GRADIENT_IMPORTANCES = (tp.importance.GroupTaylorImportance, tp.importance.GroupHessianImportance)
#: Channel-ratio increment while pruning towards a MACs target.
MACS_SEARCH_STEP = 0.02


def resolve_ignored(module: nn.Module, example: Any, ignored_layers: list[str]) -> list[str]:
    """The module names never pruned: the output layer(s) and ``ignored_layers`` (refused when unknown)."""
    names = dict(module.named_modules())
    unknown = [n for n in ignored_layers if n not in names]
    if unknown:
        raise ValueError(
            f"`ignored_layers` names {unknown} that are not modules of {type(module).__name__}; "
            f"its modules are: {[n for n in names if n]}."
        )
    return list(dict.fromkeys(output_layers(module, example) + ignored_layers))


def trace_forward(module: nn.Module, example: Any) -> None:
    """Run the user's forward on ``example``; a failure explains what tracing needs."""
    try:
        call_module(module, example)
    except Exception as err:  # any failure of the user's forward on the example
        raise trace_error(module, example, err) from err


def trace_pruner(
    module: nn.Module,
    example: Any,
    importance_for: Callable[[nn.Module], tp.importance.Importance],
    ignored_layers: list[str],
    resolved: Optional[list[str]] = None,
    global_pruning: bool = False,
    max_pruning_ratio: float = 0.95,
    round_to: Optional[int] = None,
    customized_pruners: Optional[dict[Any, Any]] = None,
    sparsity_regularization: float = 0.0,
) -> tuple[tp.pruner.BasePruner, list[str]]:
    """Trace ``module`` on ``example`` into a torch-pruning pruner ranking channels by
    ``importance_for(module)`` (a regularizing pruner with ``sparsity_regularization``).

    ``resolved`` are the module names never pruned found by an earlier trace; else they are
    resolved here (:func:`resolve_ignored`). Returns the pruner and those names.
    """
    trace_forward(module, example)
    ignored = resolve_ignored(module, example, ignored_layers) if resolved is None else resolved
    heads = find_heads(module)
    if heads.attention and global_pruning:
        raise ValueError(
            f"global_pruning=True would leave the attention layers of {type(module).__name__} with different head "
            "counts and widths, which its modules' attributes and a Hugging Face config cannot hold; "
            "set `global_pruning: false` (each layer loses the same share)."
        )
    unwrapped = root_parameters(module, heads.hidden) if heads.attention else []
    check_pruners(module, example, ignored, customized_pruners, [p for p, _ in unwrapped])
    modules = dict(module.named_modules())
    importance = importance_for(module)
    kwargs: dict[str, Any] = {}
    if heads.attention:
        kwargs.update(num_heads=num_heads_of(heads.attention), prune_num_heads=True, prune_head_dims=False)
        kwargs["unwrapped_parameters"] = unwrapped
    pruner_cls: type = tp.pruner.BasePruner
    if sparsity_regularization > 0:
        bn_scale = isinstance(importance, tp.importance.BNScaleImportance)
        pruner_cls = tp.pruner.BNScalePruner if bn_scale else tp.pruner.GroupNormPruner
        kwargs["reg"] = sparsity_regularization
    try:
        pruner = pruner_cls(
            module,
            traced_inputs(example),
            importance=importance,
            global_pruning=global_pruning,
            pruning_ratio=0.0,
            max_pruning_ratio=max_pruning_ratio,
            iterative_steps=1,
            ignored_layers=[modules[n] for n in ignored],
            round_to=round_to,
            customized_pruners=customized_pruners,
            **kwargs,
        )
    except Exception as err:  # tracing failures surface as many exception types
        raise trace_error(module, example, err) from err
    from lightning_trust.compression.pruning_checks import check_prunable  # it calls step_pruner

    check_prunable(pruner, module, ignored, heads)
    return pruner, ignored


def dense_counts(pruner: tp.pruner.BasePruner, names: Mapping[nn.Module, str]) -> tuple[dict[str, int], dict[str, int]]:
    """The output and input channel counts the pruner was traced with, by module name."""
    out = {names[m]: int(c) for m, c in pruner.layer_init_out_ch.items() if c is not None and m in names}
    in_ = {names[m]: int(c) for m, c in pruner.layer_init_in_ch.items() if c is not None and m in names}
    return out, in_


def restore_dense_counts(
    pruner: tp.pruner.BasePruner,
    names: Mapping[nn.Module, str],
    scope: Mapping[str, int],
    out: Mapping[str, int],
    in_: Mapping[str, int],
) -> None:
    """Rank a pruner traced on a pruned model (after a resume) against the dense channel counts."""
    pruner_initial_channels(pruner).update(scope)
    for module in list(pruner.layer_init_out_ch):
        name = names.get(module)
        if name is None:
            continue
        if name in out:
            pruner.layer_init_out_ch[module] = out[name]
        if name in in_:
            pruner.layer_init_in_ch[module] = in_[name]


@dataclass
class DenseCounts:
    """The dense model's channel counts a pruner ranks against, by module name: the schedule's ratios
    are relative to the dense model, and after a resume the pruner is traced on the pruned one."""

    scope: dict[str, int] = field(default_factory=dict)  # torch-pruning's per-scope initial channels
    out: dict[str, int] = field(default_factory=dict)
    in_: dict[str, int] = field(default_factory=dict)

    def keep(self, pruner: tp.pruner.BasePruner, module: nn.Module) -> None:
        """Give a pruner traced again (after a step has run) the dense counts; else remember its own."""
        names = {m: n for n, m in module.named_modules()}
        if self.scope:
            restore_dense_counts(pruner, names, self.scope, self.out, self.in_)
        else:
            self.out, self.in_ = dense_counts(pruner, names)

    def after_step(self, pruner: tp.pruner.BasePruner) -> None:
        """Remember the pruner's per-scope initial channels once it has pruned."""
        self.scope = {str(k): int(v) for k, v in pruner_initial_channels(pruner).items()}

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"init_scope": dict(self.scope), "init_out": dict(self.out), "init_in": dict(self.in_)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DenseCounts:
        return cls(dict(state["init_scope"]), dict(state["init_out"]), dict(state["init_in"]))


def check_gradients(pruner: tp.pruner.BasePruner, module: nn.Module, importance: str) -> None:
    """Refuse a gradient importance when no parameter has a gradient."""
    if isinstance(pruner.importance, GRADIENT_IMPORTANCES) and not any(p.grad is not None for p in module.parameters()):
        raise RuntimeError(
            f"importance={importance!r} needs gradients, but no parameter has `.grad` after the training "
            "batch (manual optimization that zeroes them?). Use importance='group_magnitude' or keep the gradients."
        )


def step_pruner(
    pruner: tp.pruner.BasePruner,
    module: nn.Module,
    ratio: float,
    ops: list[PruningOp],
    snapshots: dict[str, nn.Module],
    heads: Optional[Heads] = None,
    dense_heads: int = 0,
) -> None:
    """Prune ``module`` to channel ratio ``ratio``, recording the operations in ``ops``/``snapshots``.

    With attention ``heads`` (``dense_heads`` per layer before the first step): whole heads go first, to
    ``round(dense_heads * (1 - ratio))`` per layer (at least one), the residual stream to ``heads * head_size``
    channels, then the MLP widths to ``ratio``; the modules' attributes and config follow the shapes."""
    if heads is None or not heads.attention:
        _sub_step(pruner, module, ratio, 0.0, ops, snapshots)
        return
    first = heads.attention[0]
    keep = max(1, round(dense_heads * (1.0 - ratio)))
    hidden = hidden_ratio(keep, dense_heads, first.head_size) if heads.config else ratio
    width = heads.hidden  # before this step: the groups are classified while the residual stream shrinks
    _sub_step(pruner, module, hidden, head_ratio(first.measured_heads() - keep, first.measured_heads()), ops,
              snapshots, lambda g: group_kind(g, heads, pruner.DG, width) in ("heads", "hidden"))  # fmt: skip
    heads.sync(module)
    _sub_step(pruner, module, ratio, 0.0, ops, snapshots, lambda g: group_kind(g, heads, pruner.DG, 0) == "mlp")
    heads.sync(module)


def _sub_step(
    pruner: tp.pruner.BasePruner,
    module: nn.Module,
    ratio: float,
    heads_ratio: float,
    ops: list[PruningOp],
    snapshots: dict[str, nn.Module],
    keep: Optional[Callable[[Any], bool]] = None,
) -> None:
    # torch-pruning reads the ratio of its current step from `per_step_pruning_ratio`; the callback owns the
    # schedule (epochs, resume, MACs targets), so it sets the one ratio of the step it runs now
    step = pruner.current_step
    pruner.iterative_steps = step + 1
    pruner.per_step_pruning_ratio = [float(ratio)] * (step + 2)
    pruner.per_step_head_pruning_ratio = [float(heads_ratio)] * (step + 2)
    if isinstance(pruner.importance, tp.importance.GroupHessianImportance):
        pruner.importance.zero_grad()
        pruner.importance.accumulate_grad(module)
    groups = pruner.step(interactive=True)
    prune_groups(pruner.DG, groups if keep is None else (g for g in groups if keep(g)), ops, snapshots)


def step_to_macs(
    pruner: tp.pruner.BasePruner,
    module: nn.Module,
    example: Any,
    goal: float,
    ratio: float,
    max_ratio: float,
    ops: list[PruningOp],
    snapshots: dict[str, nn.Module],
    heads: Optional[Heads] = None,
    dense_heads: int = 0,
) -> float:
    """Raise the channel ratio from ``ratio`` in small steps until the measured MACs reach ``goal``;
    returns the channel ratio reached."""
    macs, _ = count_macs_params(module, example)
    while macs > goal and ratio < max_ratio - 1e-9:
        ratio = min(ratio + MACS_SEARCH_STEP, max_ratio)
        step_pruner(pruner, module, ratio, ops, snapshots, heads, dense_heads)
        macs, _ = count_macs_params(module, example)
    return ratio


def prune_step(
    pruner: tp.pruner.BasePruner,
    module: nn.Module,
    optimizers: list[Any],
    example: Any,
    target: float,
    channel_ratio: float,
    max_ratio: float,
    macs_goal: Optional[float],
    seed: int,
    importance: str = "",
    heads: Optional[Heads] = None,
    dense_heads: int = 0,
) -> tuple[float, list[list[Any]]]:
    """One pruning step to channel ratio ``target`` (or, with ``macs_goal``, up from ``channel_ratio``
    until the MACs reach it), with the same decisions on every rank (random importance) and without
    touching the training RNG; the ``optimizers`` keep their state for the kept channels. Returns
    the channel ratio reached and the new pruning history. ``importance`` names the importance in errors."""
    check_gradients(pruner, module, importance)
    old_params = dict(module.named_parameters())
    ops: list[PruningOp] = []
    snapshots: dict[str, nn.Module] = {}
    history_len = len(pruner.DG.pruning_history())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if macs_goal is None:
            step_pruner(pruner, module, target, ops, snapshots, heads, dense_heads)
            channel_ratio = target
        else:
            channel_ratio = step_to_macs(
                pruner, module, example, macs_goal, channel_ratio, max_ratio, ops, snapshots, heads, dense_heads
            )
    history = new_history(pruner, history_len)
    carry_optimizer_state(optimizers, old_params, dict(module.named_parameters()), ops, snapshots)
    return channel_ratio, history


def new_history(pruner: tp.pruner.BasePruner, since: int) -> list[list[Any]]:
    """The pruning operations recorded since ``since``, as plain ``[layer, is_out, idxs]`` lists."""
    return [[layer, bool(is_out), plain_idxs(idxs)] for layer, is_out, idxs in pruner.DG.pruning_history()[since:]]


def regularize(pruner: tp.pruner.BasePruner, module: nn.Module, reg: float) -> None:
    """Apply the pruner's sparsity regularizer to the gradients of ``module``."""
    if isinstance(pruner, tp.pruner.BNScalePruner):
        pruner.regularize(module, reg=reg)
    else:
        pruner.regularize(module)
