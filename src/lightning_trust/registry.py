"""Where the CLI (and the docs) find the pack's callbacks: every area's public Callback and Strategy
classes, imported so that jsonargparse resolves their short ``class_path`` (``class_path:
DifferentialPrivacy``).

Example:
    >>> classes = callback_classes()
    >>> classes["TrustReport"].__module__
    'lightning_trust.report.callback'
    >>> areas_of(classes)["report"]
    ['TrustReport']
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from types import ModuleType

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy

__all__ = ["AREAS", "areas_of", "callback_classes", "import_callbacks"]

#: Subpackages whose public callbacks the CLI makes available by short ``class_path``.
AREAS: tuple[str, ...] = ("privacy", "federated", "explain", "fairness", "compression", "evaluation", "report")


def import_callbacks() -> dict[str, ModuleType]:
    """Import every area so jsonargparse sees its Callback subclasses; an area whose optional
    dependency is missing (flwr for federated, say) is skipped with a warning naming the extra.
    Returns ``{area: module}`` of the areas imported."""
    modules: dict[str, ModuleType] = {}
    for area in AREAS:
        try:
            modules[area] = importlib.import_module(f"lightning_trust.{area}")
        except ImportError as err:  # pragma: no cover - depends on the installed extras
            warnings.warn(
                f"lightning_trust.{area} is unavailable ({err}); install `lightning-trust[all]` to use it.",
                stacklevel=2,
            )
    return modules


def callback_classes() -> dict[str, type]:
    """``{short name: class}`` of every public Callback (and Strategy) an area exports in ``__all__``,
    in area order: the names a YAML ``class_path`` may use."""
    found: dict[str, type] = {}
    for module in import_callbacks().values():
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name, None)
            if isinstance(value, type) and issubclass(value, (Callback, Strategy)):
                found[name] = value
    return found


def areas_of(classes: Mapping[str, type]) -> dict[str, list[str]]:
    """``{area: [class names]}`` for classes from :func:`callback_classes`."""
    grouped: dict[str, list[str]] = {}
    for name, cls in classes.items():
        grouped.setdefault(cls.__module__.split(".")[1], []).append(name)
    return grouped
