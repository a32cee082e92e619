"""Which pack callbacks can train together, decided from what each one declares.

Each callback declares what it does to training (:class:`Capability`) in ``capabilities`` and,
in ``refuses``, the capabilities of *other* callbacks it cannot work beside, each with the reason
and the fix. One checker (:func:`check_compatibility`) runs at ``setup`` and raises one
:class:`IncompatibleCallbacksError` naming both callbacks. No area imports another area to find
out what else is in the Trainer: it asks :func:`callbacks_with`.

Example:
    >>> from lightning.pytorch.callbacks import Callback
    >>> class Private(Callback):
    ...     capabilities = frozenset({Capability.PER_SAMPLE_GRADIENTS})
    >>> class Exporter(Callback):
    ...     capabilities = frozenset({Capability.EXPORTED_GRAPH})
    ...     refuses = {Capability.PER_SAMPLE_GRADIENTS: "the exported graph bypasses the hooked layers; "
    ...                "quantize after private training"}
    >>> class T:  # a stand-in for a Trainer
    ...     callbacks = [Private(), Exporter()]
    >>> try:
    ...     check_compatibility(T())
    ... except IncompatibleCallbacksError as err:
    ...     print(str(err).split(":")[0])
    Exporter cannot train in the same fit as Private
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, Optional

from lightning_trust.core.protocol import section_names

__all__ = [
    "Capability",
    "IncompatibleCallbacksError",
    "callbacks_with",
    "capabilities_of",
    "check_compatibility",
    "find_callback",
]


class Capability(str, Enum):
    """What a callback does to training; other callbacks may refuse to run beside it."""

    REPLACES_TRAIN_LOADER = "replaces the train loader"
    PER_SAMPLE_GRADIENTS = "computes per-sample gradients and replaces each gradient by a clipped, noised sum (DP-SGD)"
    NEEDS_INDEPENDENT_LOSSES = "needs a loss that is a sum of independent per-sample losses"
    CHANGES_PARAMETERS = "changes the parameter structure during training"
    EXPORTED_GRAPH = "runs the module through an exported graph"
    EXTRA_PASSES = "runs extra forward passes outside the training steps"
    ADDS_LOSS_TERM = "adds a term to the training loss"
    EDITS_GRADIENTS = "edits the gradients before the optimizer step"
    FEDERATED_ROUNDS = "trains in federated rounds of clients"


class IncompatibleCallbacksError(ValueError):
    """Two callbacks in one Trainer cannot work together; the message names both, why, and the fix."""

    def __init__(self, refusing: Any, other: Any, capability: Capability, reason: str) -> None:
        self.refusing, self.other, self.capability = refusing, other, capability
        super().__init__(
            f"{type(refusing).__name__} cannot train in the same fit as {type(other).__name__}: "
            f"{type(other).__name__} {capability.value}, and {reason}."
        )


def capabilities_of(callback: Any) -> frozenset[Capability]:
    """What ``callback`` declares it does to training (empty for callbacks outside the pack)."""
    return frozenset(getattr(callback, "capabilities", ()) or ())


def callbacks_with(trainer: Any, capability: Capability) -> list[Any]:
    """The Trainer's callbacks that declare ``capability``, in Trainer order."""
    return [cb for cb in getattr(trainer, "callbacks", None) or [] if capability in capabilities_of(cb)]


def find_callback(trainer: Any, cls: type) -> Optional[Any]:
    """The first callback of type ``cls`` in the Trainer, or ``None`` (for callbacks of one area)."""
    return next((cb for cb in getattr(trainer, "callbacks", None) or [] if isinstance(cb, cls)), None)


def check_compatibility(trainer: Any, fitting: bool = True) -> None:
    """Refuse any two reporting callbacks that would write the same report section and, when
    ``fitting``, any pair of callbacks where one refuses what the other declares."""
    section_names(trainer)
    if not fitting:
        return
    callbacks = list(getattr(trainer, "callbacks", None) or [])
    for refusing in callbacks:
        refuses: Mapping[Capability, str] = getattr(refusing, "refuses", None) or {}
        if not refuses:
            continue
        for other in callbacks:
            if other is refusing:
                continue
            for capability in capabilities_of(other):
                if capability in refuses:
                    raise IncompatibleCallbacksError(refusing, other, capability, refuses[capability])
