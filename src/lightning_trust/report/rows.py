"""What the Markdown and HTML renderings of a model card share: the rows they show and their text.

Every function here is a pure function of the card dict (the JSON as written), so both renderings
and ``lightning-trust report`` give the same bytes from the same JSON.

Example:
    >>> section_rows({"epsilon": 2.5, "by_group": [{"group": "a", "rate": 0.5}]}, "privacy")
    ([('privacy.epsilon', '2.5')], [('privacy.by_group', ['group', 'rate'], [['a', '0.5']], 1)])
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

from lightning_trust.report.figures import caption
from lightning_trust.report.standards import format_number

__all__ = [
    "VERDICT",
    "balance_text",
    "config_text",
    "fact_rows",
    "figure_caption",
    "figures_by_section",
    "groups_text",
    "requirement_text",
    "schema_text",
    "section_rows",
    "section_title",
    "split_metrics",
    "standards_summary",
    "summary_line",
    "value_text",
]

VERDICT = {"met": "met", "not_met": "NOT MET", "not_measured": "not measured", "unknown": "unknown name"}
_TABLE_ROWS = 25  # rows of a list-of-records sub-table before "... more in the JSON"
_INLINE_LIST = 12  # scalars of a list written inline


def schema_text(card: Mapping[str, Any]) -> str:
    """``model card schema 1.2``, and the version it was read from when :func:`~lightning_trust.report.load_card` upgraded it."""
    text = f"model card schema {card['schema_version']}"
    return text + (f", read from a {card['migrated_from']} card" if card.get("migrated_from") else "")


def section_title(name: str) -> str:
    return name.replace("_", " ").title()


def value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) <= _INLINE_LIST and all(not isinstance(v, (dict, list, tuple)) for v in value):
            return ", ".join(value_text(v) for v in value) if value else "(none)"
        return f"[{len(value)} items]"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return format_number(value)


def _is_records(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _flat_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_record(value, f"{name}."))
        else:
            out[name] = value
    return out


def section_rows(
    section: Mapping[str, Any], prefix: str
) -> tuple[list[tuple[str, str]], list[tuple[str, list[str], list[list[str]], int]]]:
    """A section as (dotted name, text) rows plus sub-tables for lists of records."""
    rows: list[tuple[str, str]] = []
    tables: list[tuple[str, list[str], list[list[str]], int]] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(item, f"{name}.{key}")
        elif _is_records(value):
            records = [_flat_record(r) for r in value]
            columns: list[str] = []
            for record in records:
                columns += [c for c in record if c not in columns]
            body = [[value_text(r.get(c)) if c in r else "" for c in columns] for r in records[:_TABLE_ROWS]]
            tables.append((name, columns, body, len(records)))
        else:
            rows.append((name, value_text(value) if value != {} else "(empty)"))

    for key, value in section.items():
        walk(value, f"{prefix}.{key}")
    return rows, tables


def _size(num_bytes: Optional[int]) -> str:
    """Bytes as the card's number (the text a standard on ``model.size_bytes`` shows), then in KiB/MiB."""
    if num_bytes is None:
        return "n/a"
    text = f"{format_number(num_bytes)} B"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{text} ({num_bytes / scale:.1f} {unit})"
    return text


def _duration(seconds: Any) -> str:
    """Seconds as the card's number (the text a standard on ``training.duration_s`` shows)."""
    if not isinstance(seconds, (int, float)):
        return "n/a"
    text = f"{format_number(seconds)} s"
    return text if seconds < 120 else f"{text} ({int(seconds // 60)} min {seconds % 60:.0f} s)"


def groups_text(counts: Mapping[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{name}: {format_number(n)} ({100 * n / total:.1f}%)" for name, n in counts.items())


def balance_text(split: Mapping[str, Any]) -> str:
    balance = split.get("class_balance")
    if not balance:
        return "n/a"
    return ", ".join(f"{name}: {format_number(share)}" for name, share in balance.items())


def summary_line(card: Mapping[str, Any]) -> str:
    """One line: ``3 of 4 standards met; 1 not met: privacy.epsilon``."""
    summary = card["summary"]
    if not summary["standards"]:
        return "No standards declared."
    text = f"{summary['met']} of {summary['standards']} standards met"
    failed = [s["name"] for s in card["standards"] if s["status"] == "not_met"]
    missing = [s["name"] for s in card["standards"] if s["status"] == "not_measured"]
    unknown = [s["name"] for s in card["standards"] if s["status"] == "unknown"]
    if failed:
        text += f"; {len(failed)} not met: {', '.join(failed)}"
    if missing:
        text += f"; {len(missing)} not measured: {', '.join(missing)}"
    if unknown:
        text += f"; {len(unknown)} unknown (names the run does not report): {', '.join(unknown)}"
    return text + "."


def standards_summary(card: Mapping[str, Any], path: Optional[str] = None) -> str:
    """The console summary printed at the end of a run: card path, then one line per standard."""
    lines = []
    if path:
        lines.append(f"Model card: {path} (and .md, .json)")
    lines.append(f"Standards: {summary_line(card)}")
    width = max((len(s["name"]) for s in card["standards"]), default=0)
    for s in card["standards"]:
        lines.append(
            f"  [{VERDICT[s['status']]:^12}] {s['name']:<{width}} = {format_number(s['value'])}  (required {requirement_text(s)})"
            + (f"  [{s['note']}]" if s.get("note") else "")
        )
    return "\n".join(lines)


def requirement_text(entry: Mapping[str, Any]) -> str:
    low, high = entry.get("min"), entry.get("max")
    if low is not None and high is not None:
        return f"between {format_number(low)} and {format_number(high)}"
    if low is not None:
        return f">= {format_number(low)}"
    return f"<= {format_number(high)}"


def _hardware_text(hw: Mapping[str, Any]) -> str:
    text = f"{hw.get('accelerator', '?')} x {hw.get('devices', '?')}"
    if hw.get("num_nodes", 1) != 1:
        text += f" x {hw['num_nodes']} nodes"
    text += f", {hw.get('strategy', '?')}, precision {hw.get('precision', '?')}"
    if hw.get("gpus"):
        text += f", GPUs: {', '.join(hw['gpus'])}"
    text += f"; {hw.get('platform', '?')}, {hw.get('cpu_count', '?')} CPUs, Python {hw.get('python', '?')}"
    return text


def fact_rows(card: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
    model, training = card["model"], card["training"]
    shape = model.get("input_shape")
    return {
        "Model": [
            ("Class", f"`{model['class']}`"),
            ("Parameters", f"{format_number(model['params'])} (trainable {format_number(model['trainable_params'])})"),
            ("Size", _size(model.get("size_bytes"))),
            ("MACs per sample", format_number(model.get("macs"))),
            ("Input shape", " x ".join(map(str, shape)) if shape else "n/a"),
        ],
        "Training": [
            ("Epochs", _epochs_text(training)),
            ("Optimizer steps", format_number(training["global_steps"])),
            ("Training time", _duration(training["duration_s"])),
            ("Seed", format_number(training["seed"])),
            ("Hardware", _hardware_text(training["hardware"])),
        ],
    }


_MODEL_METRIC_PREFIXES = ("train", "val", "valid", "validation", "test", "epoch", "step")


def split_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """The model's own metrics (``val/acc``, ``train_loss``...) and those the pack's callbacks logged."""
    own: dict[str, float] = {}
    others: dict[str, float] = {}
    for name, value in metrics.items():
        head = name.split("/", 1)[0] if "/" in name else ""
        (own if not head or head in _MODEL_METRIC_PREFIXES else others)[name] = value
    return own, others


def config_text(config: Any) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")


def _epochs_text(training: Mapping[str, Any]) -> str:
    text = format_number(training["epochs"])
    final = training.get("final_epoch")
    return text if final is None or not training["epochs"] else f"{text} (final epoch {format_number(final)})"


def figure_caption(figure: Mapping[str, Any]) -> str:
    """The caption of a card figure (cards before schema 1.1 carry none: made from the name)."""
    return str(figure.get("caption") or caption(figure["section"], figure["name"]))


def figures_by_section(card: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for figure in card["figures"]:
        grouped.setdefault(figure["section"], []).append(figure)
    return grouped
