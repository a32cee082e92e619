"""Declared standards: limits on reported numbers, addressed by dotted name, judged met / not met.

A standard is ``{name: {min: ..., max: ...}}`` (either bound or both, inclusive). ``name`` is a
dotted path into the card: a reporting callback's section and keys (``privacy.epsilon``,
``evaluation.ood_gap.accuracy``, ``robustness.robust_accuracy.fgsm.0.1``) or a run fact
(``model.params``, ``training.duration_s``, ``metrics.val/acc``).

Example:
    >>> standards = parse_standards({"privacy.epsilon": {"max": 8}})
    >>> [judge(s, {"privacy.epsilon": 3.2})["status"] for s in standards]
    ['met']
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

#: Top-level names of the run's facts in the card; callback sections live beside them.
FACT_SECTIONS: tuple[str, ...] = ("model", "data", "training", "metrics")
#: Facts left out of the addressable names (configuration and versions are not measurements).
_NOT_ADDRESSABLE: tuple[str, ...] = ("training.config", "training.packages", "model.hyperparameters")
_BOUNDS = ("min", "max")


class UnknownStandardError(ValueError):
    """A standard names a number the run does not report; the message lists the names it does."""


@dataclass(frozen=True)
class Standard:
    """One declared limit: ``min <= value <= max`` (a missing bound is open)."""

    name: str
    min: Optional[float] = None
    max: Optional[float] = None

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    def requirement(self) -> str:
        """Human-readable requirement, e.g. ``<= 8`` or ``between 0.8 and 1``."""
        if self.min is not None and self.max is not None:
            return f"between {format_number(self.min)} and {format_number(self.max)}"
        if self.min is not None:
            return f">= {format_number(self.min)}"
        return f"<= {format_number(self.max)}"


def parse_standards(standards: Optional[Mapping[str, Any]]) -> list[Standard]:
    """Validate the YAML-settable ``{name: {min: x, max: y}}`` mapping into :class:`Standard` objects."""
    if standards is None:
        return []
    if not isinstance(standards, Mapping):
        raise TypeError(
            f"`standards` must map dotted names to limits, e.g. {{'privacy.epsilon': {{'max': 8}}}}; got {standards!r}."
        )
    parsed = []
    for name, spec in standards.items():
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"Standard name {name!r} must be a dotted name like 'privacy.epsilon'.")
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(
                f"Standard {name!r} must be a mapping with `min` and/or `max`, e.g. {{'max': 8}}; got {spec!r}."
            )
        unknown = sorted(set(spec) - set(_BOUNDS))
        if unknown:
            raise ValueError(f"Standard {name!r} has unknown keys {unknown}; use `min` and/or `max`.")
        bounds: dict[str, Optional[float]] = {}
        for bound in _BOUNDS:
            value = spec.get(bound)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
            ):
                raise ValueError(f"Standard {name!r}: `{bound}` must be a number, got {value!r}.")
            bounds[bound] = None if value is None else float(value)
        if bounds["min"] is None and bounds["max"] is None:
            raise ValueError(f"Standard {name!r} sets neither `min` nor `max`; set at least one.")
        if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
            raise ValueError(f"Standard {name!r}: `min` ({bounds['min']}) is above `max` ({bounds['max']}).")
        parsed.append(Standard(name=name, min=bounds["min"], max=bounds["max"]))
    return parsed


def addressable(card: Mapping[str, Any]) -> dict[str, Any]:
    """The tree standards address: callback sections by name and the run's facts."""
    tree: dict[str, Any] = {name: card.get(name, {}) for name in FACT_SECTIONS}
    tree.update(card.get("sections", {}))
    return tree


def flatten_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number (not bool) in ``tree`` by dotted name; list items by index.

    Keys are joined, never split, so keys that contain dots (``"0.1"``) stay addressable.
    """
    out: dict[str, float] = {}

    def walk(value: Any, name: str) -> None:
        if name in _NOT_ADDRESSABLE:
            return
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{name}.{index}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value

    walk(tree, prefix)
    return out


def judge(standard: Standard, numbers: Mapping[str, float]) -> dict[str, Any]:
    """The card entry of one standard: its bounds, the measured value and the verdict."""
    value = numbers.get(standard.name)
    entry: dict[str, Any] = {"name": standard.name, "min": standard.min, "max": standard.max, "value": None}
    if value is None:
        entry["status"] = "not_measured"
        return entry
    value = float(value)
    ok = not math.isnan(value)
    ok = ok and (standard.min is None or value >= standard.min) and (standard.max is None or value <= standard.max)
    entry["value"] = value if math.isfinite(value) else None
    entry["status"] = "met" if ok else "not_met"
    return entry


def unknown_message(names: list[str], numbers: Mapping[str, float]) -> str:
    """Error text for standards on names the run does not report: close matches, then every name."""
    available = sorted(numbers)
    lines = []
    for name in names:
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.8)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        lines.append(f"  {name}{hint}")
    return (
        "These standards name numbers the run does not report:\n"
        + "\n".join(lines)
        + f"\nThe run reports these {len(available)} names:\n  "
        + "\n  ".join(available)
    )


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {status: sum(e["status"] == status for e in entries) for status in ("met", "not_met", "not_measured")}
    return {"standards": len(entries), **counts, "all_met": counts["met"] == len(entries)}


def format_number(value: Any, precise: bool = False) -> str:
    """Compact, stable text for a number in the card (same input, same text); ``precise``: 6 digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            whole = int(value)
            return f"{whole:,}" if abs(whole) >= 1000 else str(whole)
        if abs(value) >= 10000:
            return f"{value:,.1f}"
        return f"{value:.6g}" if precise else f"{value:.4g}"
    return str(value)
