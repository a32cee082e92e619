"""The checks of :class:`~lightning_trust.compression.ProgressivePruning` that need a traced pruner: a model
with nothing to prune, a pruning that breaks the forward (tried on a copy before training), and the
channel ratio measured on the layers (the report never states the planned ratio as if it were done).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_trust.compression.pruner import IMPORTANCES, trace_pruner
    >>> trace_pruner(nn.Sequential(nn.Linear(4, 2)), torch.zeros(2, 4), lambda m: IMPORTANCES["random"](), [])
    Traceback (most recent call last):
    ...
    ValueError: ProgressivePruning has nothing to prune in Sequential: every layer whose channels could be removed is ignored (['0']: the output layer(s), whose output channels are the model's outputs, and `ignored_layers`), so a pruning step would remove nothing. Remove names from `ignored_layers`, or remove ProgressivePruning for a model without hidden layers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch_pruning as tp
from torch import nn

from lightning_trust.compression.heads import Heads, find_heads, group_kind
from lightning_trust.compression.pruner import step_pruner, trace_pruner
from lightning_trust.core.batch import call_module
from lightning_trust.core.tensors import map_tensors

__all__ = ["check_prunable", "check_trial_step", "measured_channel_ratio"]


def check_prunable(pruner: tp.pruner.BasePruner, module: nn.Module, ignored: list[str], heads: Heads) -> None:
    """Refuse a model in which no group of channels can be pruned (every prunable layer is ignored)."""
    groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
    if any(group_kind(g, heads, pruner.DG, heads.hidden) != "fixed" for g in groups):
        return
    raise ValueError(
        f"ProgressivePruning has nothing to prune in {type(module).__name__}: every layer whose channels could be "
        f"removed is ignored ({ignored}: the output layer(s), whose output channels are the model's outputs, and "
        "`ignored_layers`), so a pruning step would remove nothing. Remove names from `ignored_layers`, or remove "
        "ProgressivePruning for a model without hidden layers."
    )


def check_trial_step(
    module: nn.Module,
    example: Any,
    ignored: list[str],
    ratio: float,
    max_pruning_ratio: float = 0.95,
    round_to: Optional[int] = None,
    customized_pruners: Optional[dict[Any, Any]] = None,
) -> None:
    """Before training: prune a copy of ``module`` (CPU, eval) to the final ``ratio`` and run its forward; a
    forward the pruning breaks (a tensor torch-pruning cannot prune, such as a buffer added to the pruned
    width) is refused now, not after the first pruning step."""
    trial = copy.deepcopy(module).cpu().eval()
    example = map_tensors(example, lambda t: t.cpu())
    pruner, _ = trace_pruner(trial, example, lambda m: tp.importance.GroupMagnitudeImportance(p=2), [], ignored,
                             False, max_pruning_ratio, round_to, customized_pruners)  # fmt: skip
    heads = find_heads(trial)
    dense = heads.attention[0].heads if heads.attention else 0
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            step_pruner(pruner, trial, ratio, [], {}, heads, dense)
            call_module(trial, example)
    except Exception as err:  # whatever the pruned forward raises
        raise RuntimeError(
            f"A trial pruning step on a copy of {type(module).__name__} (channel ratio {ratio:.2f}) breaks its "
            f"forward: {type(err).__name__}: {err}. Something in the forward keeps the dense width that "
            "torch-pruning cannot prune (a buffer added to a pruned tensor, e.g. a positional encoding, or a fixed "
            "reshape): register such a tensor as an `nn.Parameter(requires_grad=False)` so it is pruned with the "
            "width, or pass `customized_pruners` for the module holding it."
        ) from err


def measured_channel_ratio(pruner: tp.pruner.BasePruner, dense_out: Mapping[str, int], module: nn.Module,
                           ignored: list[str]) -> float:  # fmt: skip
    """The share of output channels removed, measured: over the layers the pruner was traced with (not the
    ``ignored`` ones), 1 - (their channels now) / (their dense channels)."""
    dense = now = 0
    for name, layer in module.named_modules():
        if name not in dense_out or any(name == n or name.startswith(f"{n}.") for n in ignored):
            continue
        channels = pruner.DG.get_out_channels(layer)
        if channels is None:
            continue
        dense += dense_out[name]
        now += int(channels)
    return 0.0 if dense == 0 else 1.0 - now / dense
