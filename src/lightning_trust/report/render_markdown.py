"""The model card as GitHub-flavoured Markdown (``model_card.md``); figures link to the copies beside it.

Example:
    >>> md_table(["Metric", "Value"], [["`val/acc`", "0.85"]])
    ['| Metric | Value |', '| --- | --- |', '| `val/acc` | 0.85 |']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_trust.report.evidence import evidence_rows, heading_rows, mapping_note
from lightning_trust.report.rows import (
    VERDICT,
    balance_text,
    config_text,
    fact_rows,
    figure_caption,
    figures_by_section,
    groups_text,
    requirement_text,
    schema_text,
    section_rows,
    section_title,
    split_metrics,
    summary_line,
)
from lightning_trust.report.standards import format_number

__all__ = ["md_table", "render_markdown"]

_MD_MARK = {"met": "✅", "not_met": "❌", "not_measured": "⚠️", "unknown": "❓"}


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as GitHub-flavoured Markdown; figures link to the copies next to the card."""
    out = [f"# {card['title']}", ""]
    out += [
        f"Written by lightning-trust {card['generator']['version']} ({schema_text(card)}) "
        f"at {card['created']}, after `{card['stage']}`.",
        "",
        "## Standards",
        "",
    ]
    summary = card["summary"]
    if summary["standards"]:
        verdict = "All standards met." if summary["all_met"] else "Standards NOT met."
        out += [f"**{verdict}** {summary_line(card)}", ""]
        out += md_table(
            ["Standard", "Required", "Measured", "Verdict"],
            [[f"`{s['name']}`", requirement_text(s), format_number(s["value"]), f"{_MD_MARK[s['status']]} {VERDICT[s['status']]}"]
             for s in card["standards"]],
        )  # fmt: skip
        out += [f"- `{s['name']}`: {s['note']}" for s in card["standards"] if s.get("note")]
    else:
        out.append("No standards declared.")
    out.append("")
    out += _md_mapping(card)
    facts = fact_rows(card)
    out += ["## Model", ""] + md_table(["", ""], [list(r) for r in facts["Model"]]) + [""]
    out += ["## Data", ""] + _md_data(card["data"])
    out += ["## Training", ""] + md_table(["", ""], [list(r) for r in facts["Training"]]) + [""]
    out += ["## Final metrics", ""]
    own, others = split_metrics(card["metrics"])
    if own:
        out += md_table(["Metric", "Value"], [[f"`{k}`", format_number(v)] for k, v in own.items()]) + [""]
    if others:
        out += [f"<details><summary>{len(others)} metrics logged by the callbacks</summary>", ""]
        out += md_table(["Metric", "Value"], [[f"`{k}`", format_number(v)] for k, v in others.items()])
        out += ["", "</details>", ""]
    if not card["metrics"]:
        out += ["No metrics logged.", ""]
    figures = figures_by_section(card)
    for name, section in card["sections"].items():
        out += [f"## {section_title(name)}", ""]
        rows, tables = section_rows(section, name)
        if rows:
            out += md_table(["Name", "Value"], [[f"`{k}`", v] for k, v in rows]) + [""]
        for table_name, columns, body, total in tables:
            out += [f"`{table_name}`:", ""] + md_table(columns, body) + [""]
            if total > len(body):
                out += [f"({total - len(body)} more rows in model_card.json.)", ""]
        for figure in figures.get(name, []):
            out += _md_figure(figure)
    out += ["## Packages", ""]
    out += md_table(["Package", "Version"], [[k, v] for k, v in card["training"]["packages"].items()]) + [""]
    if card["training"].get("config"):
        out += ["## Configuration", "", "```yaml", config_text(card["training"]["config"]), "```", ""]
    return "\n".join(out)


def _md_mapping(card: Mapping[str, Any]) -> list[str]:
    """The regulatory mapping: each kind of evidence, the headings it serves, what this run reports."""
    out = ["## Regulatory mapping", "", mapping_note(card), ""]
    out += md_table(["Evidence", "EU AI Act Annex IV", "NIST AI RMF MEASURE", "In this run"], evidence_rows(card))
    out += ["", "<details><summary>The headings</summary>", ""]
    out += md_table(["Framework", "Item", "Heading"], heading_rows(card))
    return out + ["", "</details>", ""]


def _md_figure(figure: Mapping[str, Any]) -> list[str]:
    """A picture inline, an HTML page (coloured tokens) as a link; its caption below in italics."""
    text = figure_caption(figure)
    if not figure["data"]:
        return [f"(figure `{figure['key']}` was missing or not a PNG, SVG or HTML file)", ""]
    if figure["media_type"] == "text/html":
        return [f"*{text}* (`{figure['key']}`): [open the page]({figure['file']})", ""]
    return [f"![{figure['key']}]({figure['file']})", "", f"*{text}* (`{figure['key']}`)", ""]


def _md_data(data: Mapping[str, Any]) -> list[str]:
    out = []
    if data.get("datamodule"):
        out += [f"DataModule: `{data['datamodule']}`", ""]
    if data["splits"]:
        out += md_table(
            ["Split", "Samples", "Class balance"],
            [[name, format_number(s["size"]), balance_text(s)] for name, s in data["splits"].items()],
        ) + [""]
    if data["groups"]:
        out += ["Groups in the training split:", ""]
        out += md_table(
            ["Column", "Role", "Group sizes"],
            [[f"`{name}`", g["role"], groups_text(g["counts"])] for name, g in data["groups"].items()],
        ) + [""]
    return out or ["No data facts.", ""]
