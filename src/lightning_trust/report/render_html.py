"""The model card as one self-contained HTML page (``model_card.html``): inline CSS, figures embedded
as base64 PNG, no scripts, no network.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any, Optional

from lightning_trust.report.evidence import NO_EVIDENCE, evidence_rows, heading_rows, mapping_note
from lightning_trust.report.figures import pixel_size
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
    value_text,
)
from lightning_trust.report.standards import format_number

__all__ = ["render_html"]

_HEADLINE_ROWS = 12  # top-level scalars of a section shown above its full table in the HTML

_CSS = """
:root{--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--ink:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--ink);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:24px}
header{background:#fff;border:1px solid var(--line);border-radius:10px;padding:20px 24px;margin-bottom:18px;display:flex;gap:24px;align-items:center;justify-content:space-between}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:0 0 12px}
h3{font-size:15px;margin:14px 0 6px}
.meta{color:var(--muted);font-size:13px}
.badge{border-radius:8px;padding:12px 18px;font-weight:700;font-size:17px;color:#fff;white-space:nowrap;text-align:center}
.badge small{display:block;font-weight:400;font-size:12px}
.badge.ok{background:var(--ok)}.badge.bad{background:var(--bad)}.badge.none{background:var(--muted)}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin-bottom:18px}
table{border-collapse:collapse;width:100%;font-size:13.5px;margin:4px 0 10px}
th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}
td.num{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace;background:var(--bg);padding:1px 4px;border-radius:4px}
.pill{display:inline-block;border-radius:999px;padding:1px 10px;font-weight:600;font-size:12.5px;color:#fff}
.pill.met{background:var(--ok)}.pill.not_met{background:var(--bad)}.pill.not_measured{background:var(--warn)}
.pill.unknown{background:var(--bad)}
tr.not_met td,tr.unknown td{background:#ffebe9}
.figures{display:flex;flex-wrap:wrap;gap:14px;margin-top:10px;align-items:flex-start}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff;flex:0 1 auto;max-width:100%;min-width:0}
figure.wide{flex:1 1 100%}
.shot{overflow-x:auto}
figure img{display:block;max-width:none;height:auto}
figure iframe{display:block;width:100%;height:320px;border:0;background:#fff}
figcaption{color:var(--ink);font-size:13px;margin-top:6px}
figcaption code{font-size:11.5px;color:var(--muted)}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.grid2 td:first-child{white-space:nowrap}
.scroll{max-height:420px;overflow:auto}
pre{background:var(--bg);padding:10px;border-radius:6px;overflow:auto;font-size:12.5px}
details summary{cursor:pointer;font-weight:600}
.headline{max-width:760px}.headline td:first-child{white-space:nowrap;width:45%}
.evidence{display:grid;grid-template-columns:minmax(0,1fr) 400px;gap:18px;align-items:start}
.evidence .headline{min-width:0}.evidence .headline td:first-child{white-space:normal;overflow-wrap:anywhere;width:62%}
.evidence .figures{margin-top:0}
.evidence .headline td{font-size:12.5px}
tr.absent td{color:var(--muted)}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(
    header: list[str], rows: list[list[str]], raw: bool = False, row_classes: Optional[list[str]] = None
) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes else ""
        cells = "".join(f"<td>{c if raw else _e(c)}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _html_kv(rows: list[tuple[str, str]]) -> str:
    return _html_table(["", ""], [[f"<b>{_e(k)}</b>", _e(v).replace("`", "")] for k, v in rows], raw=True)


def render_html(card: Mapping[str, Any]) -> str:
    """The card as one HTML page: inline CSS, figures embedded as base64 PNG, no scripts, no network."""
    summary = card["summary"]
    if not summary["standards"]:
        badge = '<div class="badge none">No standards declared</div>'
    elif summary["all_met"]:
        badge = f'<div class="badge ok">All {summary["standards"]} standards met<small>{_e(card["stage"])} run</small></div>'
    else:
        missed = summary["standards"] - summary["met"]
        badge = (
            f'<div class="badge bad">{missed} of {summary["standards"]} standards not met'
            f"<small>{summary['met']} met</small></div>"
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(card['title'])}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f'<header><div><h1>{_e(card["title"])}</h1><div class="meta">Written by lightning-trust '
        f"{_e(card['generator']['version'])} ({_e(schema_text(card))}) at "
        f"{_e(card['created'])}, after <code>{_e(card['stage'])}</code>.</div></div>{badge}</header>",
    ]
    # standards
    parts.append('<section id="standards"><h2>Standards</h2>')
    if card["standards"]:
        parts.append(f"<p>{_e(summary_line(card))}</p>")
        rows = [
            [f"<code>{_e(s['name'])}</code>", _e(requirement_text(s)), f'<span class="num">{_e(format_number(s["value"]))}</span>',
             f'<span class="pill {s["status"]}">{_e(VERDICT[s["status"]])}</span>']
            for s in card["standards"]
        ]  # fmt: skip
        parts.append(_html_table(["Standard", "Required", "Measured", "Verdict"], rows, raw=True,
                                 row_classes=[s["status"] for s in card["standards"]]))  # fmt: skip
        notes = [f"<li><code>{_e(s['name'])}</code>: {_e(s['note'])}</li>" for s in card["standards"] if s.get("note")]
        if notes:
            parts.append(f'<ul class="notes">{"".join(notes)}</ul>')
    else:
        parts.append("<p>No standards declared.</p>")
    parts.append("</section>")
    parts.append(_html_mapping(card))
    # facts
    facts = fact_rows(card)
    own, others = split_metrics(card["metrics"])
    metrics_html = ""
    if own:
        metrics_html += _html_table(
            ["Metric", "Value"], [[f"<code>{_e(k)}</code>", _e(format_number(v))] for k, v in own.items()], raw=True
        )
    if others:
        metrics_html += (
            f"<details><summary>{len(others)} metrics logged by the callbacks</summary><div class=scroll>"
            + _html_table(
                ["Metric", "Value"],
                [[f"<code>{_e(k)}</code>", _e(format_number(v))] for k, v in others.items()],
                raw=True,
            )
            + "</div></details>"
        )
    parts.append(
        '<div class="grid2"><section id="model"><h2>Model</h2>' + _html_kv(facts["Model"]) + "</section>"
        '<section id="training"><h2>Training</h2>' + _html_kv(facts["Training"]) + "</section></div>"
    )
    parts.append('<div class="grid2"><section id="data"><h2>Data</h2>' + _html_data(card["data"]) + "</section>")
    parts.append(
        '<section id="metrics"><h2>Final metrics</h2>'
        + (metrics_html or "<p>No metrics logged.</p>")
        + "</section></div>"
    )
    figures = figures_by_section(card)
    for name, section in card["sections"].items():
        parts.append(f'<section id="section-{_e(name)}"><h2>{_e(section_title(name))}</h2>')
        gallery = "".join(_html_figure(figure) for figure in figures.get(name, []))
        wide = any(_is_wide(f) for f in figures.get(name, []))
        headline = [
            [f"<code>{_e(name)}.{_e(k)}</code>", _e(value_text(v))]
            for k, v in section.items() if not isinstance(v, (Mapping, list, tuple))
        ][:_HEADLINE_ROWS]  # fmt: skip
        numbers = _html_table(["", ""], headline, raw=True) if headline else ""
        if gallery and numbers and not wide:
            parts.append(
                f'<div class="evidence"><div class="figures">{gallery}</div><div class="headline">{numbers}</div></div>'
            )
        elif gallery:
            parts.append(
                f'<div class="figures">{gallery}</div>' + (f'<div class="headline">{numbers}</div>' if numbers else "")
            )
        elif numbers:
            parts.append(f'<div class="headline">{numbers}</div>')
        value_rows, tables = section_rows(section, name)
        inner = ""
        if value_rows:
            inner += _html_table(["Name", "Value"], [[f"<code>{_e(k)}</code>", _e(v)] for k, v in value_rows], raw=True)
        for table_name, columns, body, total in tables:
            inner += f"<h3><code>{_e(table_name)}</code></h3>" + _html_table(columns, body)
            if total > len(body):
                inner += f"<p class=meta>{total - len(body)} more rows in model_card.json.</p>"
        if inner:
            parts.append(f'<details{" open" if not figures.get(name) else ""}><summary>All reported values</summary>'
                         f'<div class="scroll">{inner}</div></details>')  # fmt: skip
        parts.append("</section>")
    packages = [[k, v] for k, v in card["training"]["packages"].items()]
    parts.append('<section id="environment"><h2>Environment</h2>' + _html_table(["Package", "Version"], packages))
    if card["training"].get("config"):
        parts.append(
            f"<details><summary>Configuration</summary><pre>{_e(config_text(card['training']['config']))}</pre></details>"
        )
    parts.append("</section></main></body></html>")
    return "\n".join(parts) + "\n"


def _html_mapping(card: Mapping[str, Any]) -> str:
    """The regulatory mapping section: evidence kinds, their headings, and what this run reports."""
    rows = evidence_rows(card)
    table = _html_table(["Evidence", "EU AI Act Annex IV", "NIST AI RMF MEASURE", "In this run"], rows,
                        row_classes=["absent" if NO_EVIDENCE in r[3] else "" for r in rows])  # fmt: skip
    headings = _html_table(["Framework", "Item", "Heading"], heading_rows(card))
    return (
        f'<section id="regulation"><h2>Regulatory mapping</h2><p class=meta>{_e(mapping_note(card))}</p>{table}'
        f"<details><summary>The headings</summary>{headings}</details></section>"
    )


#: A picture wider than this (pixels) takes a whole row, and its section puts the numbers below it.
_WIDE_PX = 700


def _size(figure: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """Pixel size of a PNG figure (read from its data in cards before schema 1.1)."""
    if figure.get("width") and figure.get("height"):
        return int(figure["width"]), int(figure["height"])
    return pixel_size(base64.b64decode(figure["data"])) if figure.get("data") else None


def _is_wide(figure: Mapping[str, Any]) -> bool:
    size = _size(figure) if figure["media_type"] == "image/png" else None
    return figure["media_type"] == "text/html" or (size is not None and size[0] > _WIDE_PX)


def _html_figure(figure: Mapping[str, Any]) -> str:
    """One figure with its caption: a picture at no less than its pixel size (its text stays as
    large as drawn; a wide one scrolls sideways), an HTML page (coloured tokens) in a sandboxed frame."""
    key, text = _e(figure["key"]), _e(figure_caption(figure))
    cls = ' class="wide"' if _is_wide(figure) else ""
    caption = f"<figcaption>{text} <code>{key}</code></figcaption>"
    if not figure["data"]:
        return f"<figure{cls}><figcaption>figure <code>{key}</code> was missing or not a PNG, SVG or HTML file</figcaption></figure>"
    if figure["media_type"] == "text/html":
        page = base64.b64decode(figure["data"]).decode("utf-8", errors="replace")
        return (
            f'<figure{cls}><iframe class="card-page" data-key="{key}" title="{text}" sandbox="" '
            f'srcdoc="{_e(page)}"></iframe>{caption}</figure>'
        )
    pixels = _size(figure) if figure["media_type"] == "image/png" else None
    size = f' width="{pixels[0]}" height="{pixels[1]}"' if pixels else ""
    return (
        f'<figure{cls}><div class="shot"><img class="card-figure" data-key="{key}" alt="{text}"{size} '
        f'src="data:{figure["media_type"]};base64,{figure["data"]}"></div>{caption}</figure>'
    )


def _html_data(data: Mapping[str, Any]) -> str:
    out = ""
    if data.get("datamodule"):
        out += f"<p class=meta>DataModule <code>{_e(data['datamodule'])}</code></p>"
    if data["splits"]:
        out += _html_table(
            ["Split", "Samples", "Class balance"],
            [[name, format_number(s["size"]), balance_text(s)] for name, s in data["splits"].items()],
        )
    if data["groups"]:
        out += "<h3>Groups in the training split</h3>" + _html_table(
            ["Column", "Role", "Group sizes"],
            [[name, g["role"], groups_text(g["counts"])] for name, g in data["groups"].items()],
        )
    return out or "<p>No data facts.</p>"
