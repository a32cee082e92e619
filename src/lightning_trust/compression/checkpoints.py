"""Reading a compression checkpoint before Lightning loads its weights: the pruned structure or
the fake-quantized graph must exist first.

Example:
    >>> callback_state({"callbacks": {"ProgressivePruning{'ratio': 0.5}": {"done": 2}}}, "ProgressivePruning", "x")
    {'done': 2}
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_trust.core.seam import loaded_checkpoint

__all__ = ["callback_state", "on_checkpoint_load", "peek_checkpoint"]


def peek_checkpoint(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """Read a checkpoint before Lightning restores it (the structure must be rebuilt before the weights load).

    Tries ``weights_only=True`` first; a checkpoint holding other pickled objects is read the way
    Lightning itself reads it right after (a full unpickling: only for checkpoints you trust).
    """
    path = str(path)
    if not Path(path).exists():
        return None  # remote or "best"/"last" aliases are resolved by Lightning before setup; unknown: skip
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        return torch.load(path, map_location="cpu", weights_only=False)


def callback_state(checkpoint: Mapping[str, Any], cls_name: str, state_key: str) -> Optional[dict[str, Any]]:
    """A callback's saved state: by its exact ``state_key``, else the only state of that callback class."""
    states = checkpoint.get("callbacks") or {}
    if state_key in states:
        return states[state_key]
    matches = [v for k, v in states.items() if str(k).split("{", 1)[0] == cls_name]
    return matches[0] if len(matches) == 1 else None


def on_checkpoint_load(trainer: Any, module: nn.Module, fn: Callable[[Mapping[str, Any]], None]) -> Any:
    """Call ``fn(checkpoint)`` when Lightning loads a checkpoint's weights into ``module``, before any
    weight is copied (a pruned or quantized structure must exist first). Returns the hook's handle.

    Lightning restores the module's weights before any callback hook sees the checkpoint, and a
    Trainer's ``ckpt_path`` is only known once restoring starts, so this is a load-state-dict
    pre-hook on the root module: it runs before the children load, and reads the checkpoint the
    Trainer has just read (``fit/validate/test/predict(ckpt_path=...)``).
    """

    def hook(mod: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        if prefix:
            return
        checkpoint = loaded_checkpoint(trainer)
        saved = checkpoint.get("state_dict") if checkpoint else None
        if not checkpoint or not saved:
            return
        key = next(iter(saved))
        if state_dict.get(key) is saved[key]:  # torch copies the mapping, not the tensors: this is that checkpoint
            fn(checkpoint)

    return module.register_load_state_dict_pre_hook(hook)
