"""What a run leaves behind and shows: its files, figures, logged numbers and warnings.

Example:
    >>> import lightning.pytorch as pl, tempfile
    >>> trainer = pl.Trainer(default_root_dir=tempfile.mkdtemp(), logger=False, enable_progress_bar=False)
    >>> artifact_dir(trainer, "privacy").name
    'privacy'
    >>> class Check:
    ...     pass
    >>> owner = Check()
    >>> warn_once(owner, "small", "group 'x' is small")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_trust.core.tensors import to_jsonable

__all__ = [
    "DeferredFigures",
    "artifact_dir",
    "log_metrics",
    "new_figure",
    "reset_warnings",
    "save_figure",
    "warn_once",
    "write_json",
]


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
    """Write ``data`` as indented strict JSON (rank zero only; NaN becomes ``null``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data, strict=True), indent=2, sort_keys=False) + "\n")


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
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    tag = tag or path.stem
    step = trainer.global_step if step is None and trainer is not None else step
    for logger in getattr(trainer, "loggers", []) or []:
        with contextlib.suppress(Exception):  # an image a logger cannot take must not stop training
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, figure, global_step=step, close=False)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[str(path)], step=step)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, figure, f"{tag}.png")


class DeferredFigures:
    """Figures owed to the report: a drawing kept per key during fit (the latest replaces the one before)
    and run once when the report is read, so matplotlib (often more than the metric itself) costs the
    fit nothing.

    Example:
        >>> figures, drawn = DeferredFigures(), []
        >>> figures.defer("validation", lambda: drawn.append("validation"))
        >>> len(figures), drawn
        (1, [])
        >>> figures.draw(); figures.draw()  # once
        >>> drawn, len(figures)
        (['validation'], 0)
    """

    def __init__(self) -> None:
        self._owed: dict[str, Callable[[], Any]] = {}
        self.seconds = 0.0  # time spent drawing (when the report was read, outside any fit)

    def defer(self, key: str, draw: Callable[[], Any]) -> None:
        """Owe ``draw()`` under ``key``, replacing a drawing still owed under it."""
        self._owed[key] = draw

    def draw(self) -> None:
        """Run the drawings owed, once each, and time them."""
        owed, self._owed = self._owed, {}
        started = time.perf_counter()
        try:
            for draw in owed.values():
                draw()
        finally:
            self.seconds += time.perf_counter() - started

    def clear(self) -> None:
        """Forget the drawings owed (figures turned off)."""
        self._owed.clear()

    def __len__(self) -> int:
        return len(self._owed)


def log_metrics(trainer: Any, pl_module: Any, metrics: dict[str, Any], hook_allows_log: bool) -> None:
    """Log finite numbers: through ``pl_module.log`` (rank zero only, so no sync can deadlock)
    inside hooks that allow it, straight to ``trainer.loggers`` elsewhere (``on_fit_end``)."""
    values = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(float(v))}
    if not values:
        return
    if hook_allows_log:
        for name, value in values.items():
            pl_module.log(name, value, rank_zero_only=True, on_step=False, on_epoch=True, sync_dist=False)
        return
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            logger.save()
        for name, value in values.items():
            trainer.callback_metrics[name] = torch.tensor(value)


_WARNED_ATTR = "_lightning_trust_warned"


def warn_once(owner: Any, key: str, message: str, category: type[Warning] = UserWarning) -> bool:
    """Warn ``message`` (rank zero) the first time ``owner`` meets condition ``key`` in this run;
    later calls for the same key are silent (log the per-epoch values instead). Returns whether
    it warned. :func:`reset_warnings` starts a new run (call it from ``setup``)."""
    warned: set[str] = owner.__dict__.setdefault(_WARNED_ATTR, set())
    if key in warned:
        return False
    warned.add(key)
    if getattr(rank_zero_only, "rank", 0) == 0:
        warnings.warn(message, category, stacklevel=3)
    return True


def reset_warnings(owner: Any) -> None:
    """Forget which conditions ``owner`` has warned about (a new run warns again)."""
    owner.__dict__.pop(_WARNED_ATTR, None)
