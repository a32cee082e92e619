"""Progress of a long explanation pass, shown in the Trainer's own progress bar style.

Example:
    >>> class NoBar:  # a Trainer without a progress bar shows nothing
    ...     progress_bar_callback = None
    >>> with progress(NoBar(), total=3, description="Attribution") as bar:
    ...     bar.advance()
    >>> bar.shown
    False
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

__all__ = ["Progress", "progress"]


class Progress:
    """Progress of a long explanation in the Trainer's own bar style: a task in the
    :class:`~lightning.pytorch.callbacks.RichProgressBar`, a transient tqdm bar with the
    :class:`~lightning.pytorch.callbacks.TQDMProgressBar`, nothing when the Trainer shows no
    progress bar (or off rank zero)."""

    def __init__(self, trainer: Any, total: int, description: str, enabled: bool = True) -> None:
        self.total = total
        self._rich: Any = None
        self._task: Any = None
        self._tqdm: Any = None
        bar = getattr(trainer, "progress_bar_callback", None)
        if not enabled or bar is None or not getattr(trainer, "is_global_zero", True) or total <= 1:
            return
        if not getattr(bar, "is_enabled", True):
            return
        if isinstance(bar, RichProgressBar) and bar.progress is not None:
            self._rich = bar.progress
            self._task = self._rich.add_task(description, total=total)
        elif isinstance(bar, TQDMProgressBar):
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            self._tqdm = Tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stdout)

    @property
    def shown(self) -> bool:
        """Whether a bar shows this progress."""
        return self._rich is not None or self._tqdm is not None

    def advance(self, n: int = 1) -> None:
        if self._rich is not None:
            self._rich.update(self._task, advance=n)
        elif self._tqdm is not None:
            self._tqdm.update(n)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.remove_task(self._task)
        elif self._tqdm is not None:
            self._tqdm.close()


@contextmanager
def progress(trainer: Any, total: int, description: str, enabled: bool = True) -> Iterator[Progress]:
    """A :class:`Progress` closed on exit."""
    bar = Progress(trainer, total, description, enabled)
    try:
        yield bar
    finally:
        bar.close()
