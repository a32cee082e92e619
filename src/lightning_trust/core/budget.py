"""The one overhead budget: extra passes (attributions, attacks, corruption suites) that cost at most
a fraction of the fit's own time.

A callback that adds passes owns an :class:`OverheadBudget`, starts its clock when the fit starts,
runs each pass inside :meth:`OverheadBudget.timed` and asks :meth:`OverheadBudget.allows` before a
pass that is due. A pass is allowed when its expected cost (the mean of the passes timed so far)
keeps the callback's total within ``max_overhead`` of the fit's time without its passes; a pass
marked ``final`` (the result the report shows) always runs. What was skipped is counted and
reported, never hidden. The clock survives a checkpoint (:meth:`state_dict`).

Example:
    >>> now = [0.0]
    >>> budget = OverheadBudget(max_overhead=0.05, clock=lambda: now[0])
    >>> budget.start()
    >>> now[0] = 10.0
    >>> budget.allows()                    # nothing measured yet: the first pass runs
    True
    >>> with budget.timed():               # a pass of 0.5 s
    ...     now[0] = 10.5
    >>> now[0] = 12.0
    >>> budget.allows()                    # 0.5 + 0.5 s would exceed 5% of 11.5 s of fit
    False
    >>> budget.allows(final=True)          # the pass the report shows always runs
    True
    >>> now[0] = 30.0
    >>> budget.allows()                    # 0.5 + 0.5 s is within 5% of 29.5 s
    True
    >>> summary = budget.summary()
    >>> summary["runs"], summary["skipped"], round(summary["overhead"], 4)
    (1, 1, 0.0169)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

__all__ = ["DEFAULT_MAX_OVERHEAD", "OverheadBudget", "check_max_overhead"]

#: The share of a fit's own time an extra-pass callback may add by default.
DEFAULT_MAX_OVERHEAD = 0.05


def check_max_overhead(max_overhead: Optional[float]) -> Optional[float]:
    """Validate a ``max_overhead`` argument (``None``: no budget, every due pass runs)."""
    if max_overhead is None:
        return None
    if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not max_overhead > 0:
        raise ValueError(
            f"`max_overhead` must be a positive fraction of the fit's time (0.05 = 5%), or None for no budget; "
            f"got {max_overhead!r}."
        )
    return float(max_overhead)


class OverheadBudget:
    """Keep a callback's extra passes within ``max_overhead`` of the fit's own time.

    Args:
        max_overhead: the allowed ratio (extra-pass time) / (fit time without the extra passes);
            ``None``: unlimited (every due pass runs, the overhead is still measured).
        clock: seconds, monotonic (default :func:`time.perf_counter`).
    """

    def __init__(
        self, max_overhead: Optional[float] = DEFAULT_MAX_OVERHEAD, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.max_overhead = check_max_overhead(max_overhead)
        self.clock = clock
        self.spent = 0.0  # seconds inside timed passes (this fit and any resumed-from fit)
        self.runs = 0
        self.skipped = 0
        self._elapsed_before = 0.0  # wall time of earlier fits of a resumed run
        self._started: Optional[float] = None

    # ------------------------------------------------------------------ the clock
    def start(self) -> None:
        """Start (or restart after a resume) the fit clock."""
        self._started = self.clock()

    def elapsed(self) -> float:
        """Wall seconds of the fit(s) so far, extra passes included."""
        return self._elapsed_before + (self.clock() - self._started if self._started is not None else 0.0)

    def fit_seconds(self) -> float:
        """Seconds of the fit without this callback's passes."""
        return max(self.elapsed() - self.spent, 0.0)

    def overhead(self) -> float:
        """The measured ratio of pass time to fit time (0 before any fit time)."""
        fit = self.fit_seconds()
        return self.spent / fit if fit > 0 else 0.0

    # ------------------------------------------------------------------ decisions
    def expected_cost(self) -> float:
        """The expected seconds of the next pass: the mean of those timed so far (0 before any)."""
        return self.spent / self.runs if self.runs else 0.0

    def allows(self, final: bool = False) -> bool:
        """Whether a due pass may run now; a refusal is counted as skipped. ``final`` passes always run."""
        if final or self.max_overhead is None or self.runs == 0:
            return True
        if self.spent + self.expected_cost() <= self.max_overhead * self.fit_seconds():
            return True
        self.skipped += 1
        return False

    def allowance(self, running: float = 0.0) -> float:
        """Seconds a pass may still take and keep the total within budget (``inf`` without a budget).

        ``running``: seconds the pass asking has run so far (not yet in the account: they count as its
        cost, not as fit time). A final pass sizes itself with it (:meth:`affordable`) instead of
        overshooting the budget.
        """
        if self.max_overhead is None:
            return float("inf")
        fit = max(self.fit_seconds() - running, 0.0)
        return max(self.max_overhead * fit - self.spent - running, 0.0)

    def affordable(self, unit_seconds: float, units: int, minimum: int = 1, running: float = 0.0) -> int:
        """How many of ``units`` pieces of work (batches, samples) of ``unit_seconds`` each fit :meth:`allowance`
        (of a pass that has run ``running`` seconds).

        At least ``minimum`` (a result is never empty), at most ``units``.

        Example:
            >>> now = [0.0]
            >>> budget = OverheadBudget(max_overhead=0.05, clock=lambda: now[0])
            >>> budget.start(); now[0] = 100.0
            >>> budget.allowance()
            5.0
            >>> budget.affordable(unit_seconds=0.4, units=64), budget.affordable(2.0, 64, minimum=4)
            (12, 4)
        """
        if units <= 0:
            return 0
        minimum = min(max(minimum, 0), units)
        if unit_seconds <= 0:
            return units
        allowance = self.allowance(running)
        if allowance == float("inf"):
            return units
        return max(minimum, min(units, int(allowance // unit_seconds)))

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Run one pass, adding its time to the budget's account."""
        start = self.clock()
        try:
            yield
        finally:
            self.spent += self.clock() - start
            self.runs += 1

    # ------------------------------------------------------------------ read-outs and checkpoints
    def summary(self) -> dict[str, Any]:
        """Plain-JSON account: the budget, the measured overhead, passes run and skipped, seconds spent."""
        return {
            "max_overhead": self.max_overhead,
            "overhead": self.overhead(),
            "runs": self.runs,
            "skipped": self.skipped,
            "seconds": self.spent,
        }

    def state_dict(self) -> dict[str, Any]:
        """The account, for a callback's checkpoint state."""
        return {"spent": self.spent, "runs": self.runs, "skipped": self.skipped, "elapsed": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the account of a checkpoint (call :meth:`start` when the resumed fit starts)."""
        self.spent = float(state.get("spent", 0.0))
        self.runs = int(state.get("runs", 0))
        self.skipped = int(state.get("skipped", 0))
        self._elapsed_before = float(state.get("elapsed", 0.0))
        self._started = None
