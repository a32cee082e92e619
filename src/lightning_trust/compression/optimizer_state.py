"""Carrying the optimizers across a pruning step: their parameter groups point at the new
(smaller) parameters, and every state tensor shaped like a parameter (momentum, Adam moments) is
pruned like the weights, so the kept channels keep their state.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(3, 4)
    >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    >>> carry_optimizer_state([optimizer], {"weight": layer.weight}, {}, [], {})  # nothing was pruned
    >>> optimizer.param_groups[0]["params"][0] is layer.weight
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_trust.compression.structure import PruningOp

__all__ = ["carry_optimizer_state"]


def carry_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer],
    old_params: Mapping[str, nn.Parameter],
    new_params: Mapping[str, nn.Parameter],
    ops: list[PruningOp],
    snapshots: Mapping[str, nn.Module],
) -> None:
    """Point the optimizers at ``new_params`` (by name) and prune their state like the weights.

    Each state tensor shaped like its parameter is put into a copy of the layer as it was before
    the step (``snapshots``), and the step's recorded pruning operations (``ops``) are replayed on
    that copy: the kept channels keep their state, exactly as the weights do. Parameters pruned
    directly (not inside a layer) have their state pruned by their own operation.
    """
    name_of = {id(p): n for n, p in old_params.items()}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [new_params.get(name_of.get(id(p), ""), p) for p in group["params"]]
        for module_name, snapshot in snapshots.items():
            _carry_layer(optimizer, module_name, snapshot, old_params, new_params, ops)
        _carry_unwrapped(optimizer, old_params, new_params, ops)


def _carry_layer(
    optimizer: torch.optim.Optimizer,
    module_name: str,
    snapshot: nn.Module,
    old_params: Mapping[str, nn.Parameter],
    new_params: Mapping[str, nn.Parameter],
    ops: list[PruningOp],
) -> None:
    prefix = f"{module_name}." if module_name else ""
    local = {pn: old_params.get(prefix + pn) for pn, _ in snapshot.named_parameters(recurse=False)}
    states = {pn: optimizer.state.get(p) for pn, p in local.items() if p is not None}
    if not any(states.values()):
        return
    keys = {
        k
        for pn, st in states.items()
        if st
        for k, v in st.items()
        if isinstance(v, Tensor) and v.shape == local[pn].shape  # type: ignore[union-attr]
    }
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
                    op.apply(shadow)
        for pn, param in shadow.named_parameters(recurse=False):
            st = states.get(pn)
            if st and key in st:
                new_states[pn][key] = param.data.to(st[key].dtype)
    for pn, st in new_states.items():
        old = local[pn]
        if old is not None:
            optimizer.state.pop(old, None)
        new_param = new_params.get(prefix + pn)
        if new_param is not None:
            optimizer.state[new_param] = st


def _carry_unwrapped(
    optimizer: torch.optim.Optimizer,
    old_params: Mapping[str, nn.Parameter],
    new_params: Mapping[str, nn.Parameter],
    ops: list[PruningOp],
) -> None:
    for op in ops:  # unwrapped nn.Parameters pruned directly
        if not op.is_param or op.name not in old_params:
            continue
        old, new = old_params[op.name], new_params.get(op.name)
        st = optimizer.state.pop(old, None)
        if st and new is not None:
            carried: dict[str, Any] = {}
            for k, v in st.items():
                if isinstance(v, Tensor) and v.shape == old.shape:
                    v = op.apply(nn.Parameter(v.detach().clone(), requires_grad=False)).data
                carried[k] = v
            optimizer.state[new] = carried
