"""Seam (report helper R1): the epoch whose weights a pass measures, one convention for every section.

Example:
    >>> import lightning.pytorch as pl
    >>> trained_epoch(pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))
    0
"""

from __future__ import annotations

from typing import Any

__all__ = ["trained_epoch"]


def trained_epoch(trainer: Any) -> int:
    """The 0-based index of the last training epoch that ran: the epoch whose weights a pass sees.

    During an epoch's validation this is ``trainer.current_epoch``; in ``on_fit_end`` and in a
    ``test`` after fit it is one less (``current_epoch`` counts completed epochs by then). Without a
    fit (a standalone ``validate``/``test``) it is ``current_epoch``.

    Why private: Lightning's public ``current_epoch`` is the number of completed epochs, which
    changes meaning between the last validation and ``on_fit_end``; only the fit loop's progress
    (``trainer.fit_loop.epoch_progress``, a private ``_Progress`` of the private ``_FitLoop``)
    counts the epochs started, whose last index is the epoch being (or last) trained.
    """
    current = int(getattr(trainer, "current_epoch", 0) or 0)
    progress = getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None)
    started = getattr(getattr(progress, "current", None), "started", None)
    if not isinstance(started, int) or started <= 0:
        return current
    return started - 1
