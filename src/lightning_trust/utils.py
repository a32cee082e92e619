"""Small helpers shared by every callback: where files go, how figures are logged, isolated passes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from lightning_trust.protocol import Pausable


def artifact_dir(trainer: Any, area: str) -> Path:
    """The folder for an area's files in this run: ``<log_dir>/lightning_trust/<area>``.

    ``log_dir`` is the first logger's run folder (``lightning_logs/version_N``) or the Trainer's
    ``default_root_dir`` when there is no logger. Created on first use.

    Under DDP ``trainer.log_dir`` is a collective (a broadcast from rank zero): call this on every
    rank (e.g. in ``setup``) and keep the path, never from rank-zero-only code, or the run hangs.
    """
    base = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None) or os.getcwd()
    path = Path(base) / "lightning_trust" / area
    path.mkdir(parents=True, exist_ok=True)
    return path


@rank_zero_only
def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (rank zero only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")


def to_jsonable(value: Any) -> Any:
    """Convert tensors, numpy values and paths inside ``value`` into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy scalar
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def new_figure(*args: Any, **kwargs: Any) -> Any:
    """A matplotlib figure made without a display (Agg), never touching pyplot's global state."""
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


@rank_zero_only
def save_figure(trainer: Any, figure: Any, path: Path, tag: Optional[str] = None, step: Optional[int] = None) -> None:
    """Save ``figure`` as PNG at ``path`` and log it as an image to every logger that takes images.

    TensorBoard gets ``add_figure``, W&B ``log_image``, MLflow ``log_figure``; CSV loggers just
    have the file. ``tag`` defaults to the file's stem.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    tag = tag or path.stem
    step = trainer.global_step if step is None and trainer is not None else step
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        name = type(logger).__name__
        with contextlib.suppress(Exception):  # an image a logger cannot take must not stop training
            if name == "TensorBoardLogger":
                experiment.add_figure(tag, figure, global_step=step, close=False)
            elif name == "WandbLogger":
                logger.log_image(key=tag, images=[str(path)], step=step)
            elif name == "MLFlowLogger":
                experiment.log_figure(logger.run_id, figure, f"{tag}.png")


def find_callback(trainer: Any, cls: type) -> Optional[Any]:
    """The first callback of type ``cls`` in the Trainer, or ``None``."""
    for callback in getattr(trainer, "callbacks", []) or []:
        if isinstance(callback, cls):
            return callback
    return None


@contextlib.contextmanager
def isolated_eval(module: nn.Module, trainer: Any = None, grad: bool = False) -> Iterator[nn.Module]:
    """Run extra forward/backward passes on ``module`` without leaving a trace on training.

    Inside: every pack callback that can pause (DP hooks, see :class:`~lightning_trust.protocol.Pausable`)
    is paused, the module is in eval mode, gradients are enabled only when ``grad=True``, the
    parameters' ``.grad`` are saved, deterministic-algorithm mode only warns (Captum's DeepLift
    unpools max-pooling, which has no deterministic kernel), and the random number generators are forked (so sampling
    baselines or noise here does not change the training run's noise or dropout). After: the modes
    of every submodule, the grad mode, each parameter's ``requires_grad`` and ``.grad`` and the RNG
    states are restored.

    Example:
        >>> with isolated_eval(model, trainer, grad=True) as m:
        ...     attributions = IntegratedGradients(m).attribute(x, target=0)
    """
    modes = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    saved_grads = [p.grad for p in params]
    saved_requires = [p.requires_grad for p in params]
    pausers = [cb for cb in (getattr(trainer, "callbacks", None) or []) if isinstance(cb, Pausable)]
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
        for callback in pausers:
            stack.enter_context(callback.paused())
        if grad:  # validate/test run under inference_mode, where autograd cannot be re-enabled
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        if deterministic:  # e.g. Captum's DeepLift unpools max-pooling, which has no deterministic kernel
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            module.eval()
            for p in params:
                p.grad = None
            yield module
        finally:
            for m, training in modes:
                m.training = training
            for p, g, r in zip(params, saved_grads, saved_requires):
                p.grad = g
                p.requires_grad_(r)
            if deterministic:
                torch.use_deterministic_algorithms(True, warn_only=warn_only)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's module under wrappers (Opacus ``GradSampleModule``, DDP), found by ``_module``/``module``."""
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        inner = getattr(module, "_module", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module) and type(module).__name__ in {"DistributedDataParallel", "DataParallel"}:
            module = inner
            continue
        break
    return module
