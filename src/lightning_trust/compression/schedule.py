"""When pruning steps happen and how far each one prunes.

Example:
    >>> pruning_events("cubic", start_epoch=1, end_epoch=7, frequency=2)
    [1, 3, 5, 7]
    >>> [round(s, 4) for s in pruning_schedule("cubic", 0.5, 4)]
    [0.2891, 0.4375, 0.4922, 0.5]
"""

from __future__ import annotations

from typing import Literal, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["SCHEDULES", "Schedule", "check_schedule_fits", "pruning_events", "pruning_schedule", "target_at"]

Schedule = Literal["cubic", "linear", "one_shot"]
SCHEDULES: tuple[str, ...] = ("cubic", "linear", "one_shot")


def pruning_schedule(schedule: Schedule, final: float, steps: int) -> list[float]:
    """The target sparsity after each of ``steps`` pruning steps.

    ``cubic`` is Zhu & Gupta (2017), eq. 1 with initial sparsity 0: ``s_t = s_f + (0 - s_f)(1 - t/n)^3``
    for ``t = 1..n``; ``linear`` is ``s_f t / n``; ``one_shot`` is ``[s_f]``.

    Example:
        >>> [round(s, 4) for s in pruning_schedule("cubic", 0.5, 3)]
        [0.3519, 0.4815, 0.5]
    """
    if schedule == "one_shot":
        return [final]
    if steps < 1:
        raise ValueError(f"A {schedule} schedule needs at least one pruning step, got {steps}.")
    if schedule == "cubic":
        return [final + (0.0 - final) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]
    if schedule == "linear":
        return [final * t / steps for t in range(1, steps + 1)]
    raise ValueError(f"`schedule` must be 'cubic', 'linear' or 'one_shot', got {schedule!r}.")


def pruning_events(
    schedule: Schedule, start_epoch: int, end_epoch: Optional[int], frequency: int, max_epochs: Optional[int] = None
) -> list[int]:
    """The epochs with a pruning step: ``start_epoch`` to ``end_epoch`` every ``frequency`` epochs
    (``end_epoch`` defaults to ``max_epochs // 2``, the rest fine-tunes); one for ``one_shot``."""
    if schedule == "one_shot":
        return [start_epoch]
    end = end_epoch
    if end is None:
        if max_epochs is None or max_epochs < 1:
            raise ValueError("Set `end_epoch` when the Trainer has no `max_epochs`.")
        end = max(start_epoch, max_epochs // 2)
    return list(range(start_epoch, end + 1, frequency))


def check_schedule_fits(events: list[int], max_epochs: Optional[int], fast_dev_run: bool = False) -> None:
    """Refuse a schedule whose last step (at ``events[-1]``) ``fit`` never reaches (said, not refused, under
    ``fast_dev_run``)."""
    unfinished = max_epochs is not None and max_epochs > 0 and events[-1] >= max_epochs
    if unfinished and fast_dev_run:
        rank_zero_info(f"fast_dev_run: ProgressivePruning's steps at epochs {events} are cut short.")
    elif unfinished:
        raise ValueError(
            f"The pruning schedule's last step is at epoch {events[-1]}, but max_epochs={max_epochs}: "
            f"the final ratio would never be reached. Lower `end_epoch`/`start_epoch` or raise `max_epochs`."
        )


def target_at(schedule: Schedule, final: float, events: list[int], epoch: int) -> float:
    """The target after the last pruning step of ``events`` at or before ``epoch`` (0 before the first)."""
    reached = [i for i, event in enumerate(events) if event <= epoch]
    if not reached:
        return 0.0
    return pruning_schedule(schedule, final, len(events))[reached[-1]]
