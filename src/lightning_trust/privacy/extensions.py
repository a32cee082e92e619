"""What other callbacks add to a DP run (:meth:`~lightning_trust.privacy.DifferentialPrivacy.extend_training`):
loader transforms and before-noise hooks, one of each per owner.

Example:
    >>> loaders, hooks = {}, {}
    >>> owner = object()
    >>> register(loaders, hooks, owner, train_loader=lambda loader: loader)
    >>> len(loaders), len(hooks)
    (1, 0)
    >>> register(loaders, hooks, owner)  # neither: the owner's hooks removed
    >>> len(loaders)
    0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

__all__ = ["register"]


def register(
    loader_transforms: dict[int, Callable[[Any], Any]],
    before_noise_hooks: dict[int, Callable[[Any], None]],
    owner: object,
    train_loader: Optional[Callable[[Any], Any]] = None,
    before_noise: Optional[Callable[[Any], None]] = None,
) -> None:
    """Replace ``owner``'s loader transform and before-noise hook (``None`` removes it)."""
    key = id(owner)
    loader_transforms.pop(key, None)
    before_noise_hooks.pop(key, None)
    if train_loader is not None:
        loader_transforms[key] = train_loader
    if before_noise is not None:
        before_noise_hooks[key] = before_noise
