"""The history of :class:`~lightning_trust.explain.Attribution`'s passes and their **drift**: Spearman's
rank correlation of a pass's global importance with the previous pass's, over the samples both
explained (a pass cut to the budget explains a prefix of the fixed sample: two passes of different
lengths are compared on their common prefix, never on different samples).

Example:
    >>> import torch
    >>> from lightning_trust.explain.explanation import Explanation
    >>> def result(rows):
    ...     a = torch.tensor(rows)
    ...     return Explanation("validation_end", 0, 0, a, None, None, a, a, a.abs().mean(0), ["a", "b", "c"])
    >>> track = PassHistory()
    >>> track.record(result([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), top_k=2)
    >>> track.record(result([[1.0, 2.0, 3.0]]), top_k=2)  # one sample: compared on the first one
    >>> [h["drift"] for h in track.entries], [h["samples"] for h in track.entries]
    ([None, 1.0], [2, 1])
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from lightning_trust.explain.explanation import Explanation, rank_correlation

__all__ = ["PassHistory"]


class PassHistory:
    """Each pass's record (``entries``) and the last pass's per-sample ``|attribution|`` rows (the drift's
    reference), kept in a checkpoint."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.previous: Optional[Tensor] = None  # the last pass's |attribution| per sample (k x features)
        self._before: Optional[Tensor] = None  # the one before it (a pass that replaces the last)

    def undo_last(self) -> None:
        """Forget the last pass: the next one redoes it on the same weights."""
        if self.entries:
            self.entries.pop()
            self.previous = self._before

    def drift(self, result: Explanation) -> Optional[float]:
        """``result``'s drift from the last pass, over the samples both explained (``None``: no last pass)."""
        if self.previous is None:
            return None
        rows = _rows(result)
        m = min(len(rows), len(self.previous))
        return rank_correlation(rows[:m].mean(dim=0), self.previous[:m].mean(dim=0))

    def record(self, result: Explanation, top_k: int) -> None:
        """Set ``result.drift`` and add its record."""
        result.drift = self.drift(result)
        self._before, self.previous = self.previous, _rows(result)
        self.entries.append({
            "stage": result.stage, "epoch": result.epoch, "step": result.step, "drift": result.drift,
            "convergence_delta": result.convergence_delta, "infidelity": result.infidelity,
            "sensitivity_max": result.sensitivity_max, "top_features": result.top(top_k), "seconds": result.seconds,
            "samples": result.samples_explained,
        })  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.entries, "previous_rows": self.previous, "previous_before_rows": self._before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = list(state.get("history", []))
        self.previous = state.get("previous_rows")
        self._before = state.get("previous_before_rows")


def _rows(result: Explanation) -> Tensor:
    return result.input_attributions.detach().abs().float().flatten(start_dim=1).cpu()
