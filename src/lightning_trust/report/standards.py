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
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

#: Top-level names of the run's facts in the card; callback sections live beside them.
FACT_SECTIONS: tuple[str, ...] = ("model", "data", "training", "metrics")
#: Facts left out of the addressable names (configuration and versions are not measurements).
_NOT_ADDRESSABLE: tuple[str, ...] = ("training.config", "training.packages", "model.hyperparameters")
_BOUNDS = ("min", "max")
#: A standard's verdicts: ``unknown`` names a number the run does not report (the run raises).
STATUSES: tuple[str, ...] = ("met", "not_met", "not_measured", "unknown")
_STAGE_WORDS = {
    "train": "train", "training": "train", "val": "validation", "valid": "validation",
    "validation": "validation", "test": "test", "testing": "test",
}  # fmt: skip
_CLOSE = 0.8


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


def flatten_numbers(tree: Mapping[str, Any], prefix: str = "", nulls: bool = False) -> dict[str, Optional[float]]:
    """Every number (not bool) in ``tree`` by dotted name; list items by index. ``nulls``: also the
    names reported without a value (``None``: NaN in strict JSON, or not computed).

    Keys are joined, never split, so keys that contain dots (``"0.1"``) stay addressable.
    """
    out: dict[str, Optional[float]] = {}

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
        elif value is None and nulls and name:
            out[name] = None

    walk(tree, prefix)
    return out


def metric_stage(name: str) -> Optional[str]:
    """The stage a logged metric name belongs to, from its first or last word: ``val/acc`` ->
    ``"validation"``, ``train_loss`` -> ``"train"``, ``acc_test`` -> ``"test"``; ``None`` when neither says."""
    words = [w for w in re.split(r"[/_.\-]", name.lower()) if w]
    for word in (words[:1] + words[-1:]) if words else []:
        if word in _STAGE_WORDS:
            return _STAGE_WORDS[word]
    return None


def close_matches(name: str, available: Iterable[str]) -> list[str]:
    """Up to three names of ``available`` close to ``name`` (difflib, ratio >= 0.8)."""
    return difflib.get_close_matches(name, sorted(available), n=3, cutoff=_CLOSE)


def missing_metric_status(name: str, logged: Iterable[str], ran: Iterable[str]) -> str:
    """``"not_measured"`` or ``"unknown"`` for a ``metrics.<name>`` standard the run has not logged.

    Not measured only while it can still be logged: its stage (:func:`metric_stage`) has not run
    (a ``test/acc`` after ``fit``), or, for a name of no stage, no test has run and no logged name is
    close to it. A name close to a logged one (``val/accc`` beside ``val/acc``), or of a stage that
    has run, is unknown.
    """
    stage, ran = metric_stage(name), set(ran)
    if stage is not None:
        return "unknown" if stage in ran else "not_measured"
    if close_matches(name, logged) or "test" in ran:
        return "unknown"
    return "not_measured"


def judge(standard: Standard, numbers: Mapping[str, Optional[float]], missing: str = "not_measured") -> dict[str, Any]:
    """The card entry of one standard: its bounds, the measured value and the verdict.

    A name reported without a value (``None``, NaN) is ``not_met``: a number that could not be
    measured never meets a standard. An absent name gets the status ``missing``.
    """
    entry: dict[str, Any] = {"name": standard.name, "min": standard.min, "max": standard.max, "value": None}
    if standard.name not in numbers:
        entry["status"] = missing
        return entry
    value = numbers[standard.name]
    if value is None or not math.isfinite(float(value)):
        entry["status"] = "not_met"
        entry["reason"] = "no value (undefined, NaN or not computed)"
        return entry
    value = float(value)
    ok = (standard.min is None or value >= standard.min) and (standard.max is None or value <= standard.max)
    entry["value"] = value
    entry["status"] = "met" if ok else "not_met"
    return entry


def unknown_message(names: list[str], numbers: Iterable[str]) -> str:
    """Error text for standards on names the run does not report: close matches, then every name."""
    available = sorted(numbers)
    lines = []
    for name in names:
        section, _, tail = name.partition(".")
        same = [a[len(section) + 1 :] for a in available if a.startswith(f"{section}.")]
        # within the same section, on what follows it: a shared "metrics." is no likeness
        close = [f"{section}.{c}" for c in close_matches(tail, same)] if same else close_matches(name, available)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        lines.append(f"  {name}{hint}")
    return (
        "These standards name numbers the run does not report:\n"
        + "\n".join(lines)
        + f"\nFix the names. The run reports these {len(available)} names:\n  "
        + "\n  ".join(available)
    )


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {status: sum(e["status"] == status for e in entries) for status in STATUSES}
    return {"standards": len(entries), **counts, "all_met": counts["met"] == len(entries)}


def format_number(value: Any) -> str:
    """The one text of a number in the card, in every table and rendering (same input, same text):
    integers with thousands separators, other floats to 6 significant digits."""
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
        if abs(value) >= 1e5:
            return f"{value:,.1f}"
        return f"{value:,.6g}"
    return str(value)
