"""What changed between two model cards: verdicts and numbers, as data and as Markdown.

Example:
    >>> card = {"title": "a", "standards": [], "sections": {"privacy": {"epsilon": 2.0}}}
    >>> diff_cards(card, {**card, "sections": {"privacy": {"epsilon": 3.0}}})["changed"]
    [{'name': 'privacy.epsilon', 'before': 2.0, 'after': 3.0, 'delta': 1.0}]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_trust.report.render_markdown import md_table
from lightning_trust.report.rows import VERDICT
from lightning_trust.report.standards import addressable, flatten_numbers, format_number

__all__ = ["diff_cards", "render_diff_markdown"]


def diff_cards(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers and verdicts that differ between two cards (``after`` minus ``before``)."""
    a = _numbers(before)
    b = _numbers(after)
    changed = [
        {"name": k, "before": a[k], "after": b[k], "delta": b[k] - a[k]}
        for k in sorted(set(a) & set(b))
        if a[k] != b[k]
    ]
    verdicts_a = {s["name"]: s for s in before["standards"]}
    verdicts_b = {s["name"]: s for s in after["standards"]}
    standards = []
    for name in list(verdicts_a) + [n for n in verdicts_b if n not in verdicts_a]:
        sa, sb = verdicts_a.get(name), verdicts_b.get(name)
        standards.append({
            "name": name,
            "before": sa["status"] if sa else None, "after": sb["status"] if sb else None,
            "before_value": sa["value"] if sa else None, "after_value": sb["value"] if sb else None,
        })  # fmt: skip
    return {
        "before": before["title"], "after": after["title"],
        "standards": standards, "changed": changed,
        "added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
    }  # fmt: skip


def _numbers(card: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in flatten_numbers(addressable(card)).items() if v is not None}


def _signed(delta: float) -> str:
    """A change as the card writes numbers (:func:`format_number`), with its sign."""
    return ("+" if delta >= 0 else "-") + format_number(abs(delta))


def render_diff_markdown(diff: Mapping[str, Any], before_label: str = "before", after_label: str = "after") -> str:
    """The diff as Markdown: verdict changes first, then every changed number."""
    out = [f"# Model card diff: {before_label} -> {after_label}", ""]
    out += ["## Standards", ""]
    if diff["standards"]:
        out += md_table(
            ["Standard", before_label, after_label, "Change"],
            [[f"`{s['name']}`",
              f"{format_number(s['before_value'])} ({VERDICT.get(s['before'], 'absent')})",
              f"{format_number(s['after_value'])} ({VERDICT.get(s['after'], 'absent')})",
              "same" if s["before"] == s["after"] else f"{VERDICT.get(s['before'], 'absent')} -> {VERDICT.get(s['after'], 'absent')}"]
             for s in diff["standards"]],
        )  # fmt: skip
    else:
        out.append("No standards declared in either card.")
    out += ["", f"## Changed numbers ({len(diff['changed'])})", ""]
    if diff["changed"]:
        out += md_table(
            ["Name", before_label, after_label, "Delta"],
            [[f"`{c['name']}`", format_number(c["before"]), format_number(c["after"]), _signed(c["delta"])] for c in diff["changed"]],
        )  # fmt: skip
    else:
        out.append("None.")
    for kind in ("added", "removed"):
        if diff[kind]:
            out += ["", f"## Only {'after' if kind == 'added' else 'before'} ({len(diff[kind])})", ""]
            out += [f"- `{name}`" for name in diff[kind]]
    return "\n".join(out) + "\n"
