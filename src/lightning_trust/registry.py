"""Where the CLI finds the pack's callbacks: every area's subpackage, imported so short names resolve."""

from __future__ import annotations

import importlib
import warnings

#: Subpackages whose public callbacks the CLI makes available by short ``class_path``.
AREAS: tuple[str, ...] = ("privacy", "federated", "explain", "fairness", "compression", "evaluation", "report")


def import_callbacks() -> None:
    """Import every area so jsonargparse sees its Callback subclasses; an area whose optional
    dependency is missing (flwr for federated, say) is skipped with a warning naming the extra."""
    for area in AREAS:
        try:
            importlib.import_module(f"lightning_trust.{area}")
        except ImportError as err:  # pragma: no cover - depends on the installed extras
            warnings.warn(
                f"lightning_trust.{area} is unavailable ({err}); install `lightning-trust[all]` to use it.",
                stacklevel=2,
            )
