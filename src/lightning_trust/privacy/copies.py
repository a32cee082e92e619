"""What a deep copy of a DP-hooked module shares with the original.

The per-sample-gradient hooks live on the user's layers while DP trains, so a deep copy of a layer
or of the module (pruning snapshots, MAC counts, an EMA of the weights, ``torch.save`` of a copy)
copies their ``_forward_hooks`` with them. Copying the objects behind those hooks would copy the
fit's DP optimizer (Opacus's ``DPOptimizer`` cannot be deep-copied) and the hooked module. They are
shared instead: a copy's hooks are the fit's hooks, which record nothing for it outside the fit's
own training forward.

Example:
    >>> import copy
    >>> class Hooks(SharedOnCopy):
    ...     pass
    >>> hooks = Hooks()
    >>> copy.deepcopy([hooks])[0] is hooks
    True
"""

from __future__ import annotations

from typing import Any

__all__ = ["SharedOnCopy"]


class SharedOnCopy:
    """A mixin: ``copy.deepcopy`` returns the object itself."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self
