"""Extra passes that leave no trace on training: forked random generators, restored modes.

A callback that runs the module outside the user's steps (attributions, attacks, corrupted
copies, tracing for pruning or export) wraps the work in :func:`isolated_eval`. Everything it
touches comes back as it was: every random generator the run draws from, the train/eval mode of
every submodule, gradient mode, ``requires_grad`` and ``.grad``, deterministic-algorithm mode, and
any pack callback that changes how the module runs (DP hooks) is paused.

Example:
    >>> import random, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    >>> state = (torch.get_rng_state(), random.getstate())
    >>> with isolated_eval(model, grad=True) as m:
    ...     _ = m(torch.randn(4, 3)).sum().backward(); _ = random.random()
    >>> model.training, torch.equal(state[0], torch.get_rng_state()), state[1] == random.getstate()
    (True, True, True)
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lightning_trust.core.protocol import Pausable

__all__ = ["fork_rngs", "isolated_eval", "saved_modes", "unwrap_module"]


@contextlib.contextmanager
def fork_rngs(devices: Optional[list[int]] = None) -> Iterator[None]:
    """Draw freely inside: torch's CPU and CUDA generators, numpy's global one and python's
    ``random`` are restored on exit. ``devices`` are the CUDA devices to fork (default: all in use)."""
    if devices is None:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextlib.contextmanager
def saved_modes(module: nn.Module, training: Optional[bool] = None) -> Iterator[nn.Module]:
    """Restore the train/eval mode of every submodule on exit; ``training`` sets one mode inside."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        if training is not None:
            module.train(training)
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def isolated_eval(module: nn.Module, trainer: Any = None, grad: bool = False) -> Iterator[nn.Module]:
    """Run extra forward/backward passes on ``module`` without leaving a trace on training.

    Inside: every pack callback that can pause (see :class:`~lightning_trust.core.protocol.Pausable`)
    is paused, the module is in eval mode, gradients are enabled only when ``grad=True`` (also under
    Lightning's ``inference_mode`` during validation/test), the parameters' ``.grad`` are set aside,
    deterministic-algorithm mode only warns (Captum's DeepLift unpools max-pooling, which has no
    deterministic kernel), and every random generator is forked (:func:`fork_rngs`), so sampling
    baselines or noise here does not change the run's noise, dropout or shuffling.
    """
    params = list(module.parameters())
    saved_grads = [p.grad for p in params]
    saved_requires = [p.requires_grad for p in params]
    pausers = [cb for cb in (getattr(trainer, "callbacks", None) or []) if isinstance(cb, Pausable)]
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with contextlib.ExitStack() as stack:
        stack.enter_context(fork_rngs(cuda_devices))
        for callback in pausers:
            stack.enter_context(callback.paused())
        if grad:  # validate/test run under inference_mode, where autograd cannot be re-enabled
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        stack.enter_context(saved_modes(module, training=False))
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            for p in params:
                p.grad = None
            yield module
        finally:
            for p, g, r in zip(params, saved_grads, saved_requires):
                p.grad = g
                p.requires_grad_(r)
            if deterministic:
                torch.use_deterministic_algorithms(True, warn_only=warn_only)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's module under wrappers (Opacus ``GradSampleModule``, DDP, DataParallel)."""
    seen: set[int] = set()
    while id(module) not in seen:
        seen.add(id(module))
        inner = getattr(module, "_module", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module) and isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = inner
            continue
        break
    return module
