"""Render a model card (the JSON dict) as Markdown and as one self-contained HTML page, and diff two cards.

Every renderer is a pure function of the card dict: the same JSON gives the same bytes, so
``lightning-trust report model_card.json`` reproduces the Markdown the run wrote.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any, Optional

from lightning_trust.report.standards import addressable, flatten_numbers, format_number

_VERDICT = {"met": "met", "not_met": "NOT MET", "not_measured": "not measured"}
_MD_MARK = {"met": "✅", "not_met": "❌", "not_measured": "⚠️"}
_TABLE_ROWS = 25  # rows of a list-of-records sub-table before "... more in the JSON"
_INLINE_LIST = 12  # scalars of a list written inline
_HEADLINE_ROWS = 12  # top-level scalars of a section shown above its full table in the HTML


# ------------------------------------------------------------------------------------- helpers
def section_title(name: str) -> str:
    return name.replace("_", " ").title()


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) <= _INLINE_LIST and all(not isinstance(v, (dict, list, tuple)) for v in value):
            return ", ".join(_value_text(v) for v in value) if value else "(none)"
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


def section_rows(section: Mapping[str, Any], prefix: str) -> tuple[list[tuple[str, str]], list[tuple[str, list[str], list[list[str]], int]]]:
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
            body = [[_value_text(r.get(c)) if c in r else "" for c in columns] for r in records[:_TABLE_ROWS]]
            tables.append((name, columns, body, len(records)))
        else:
            rows.append((name, _value_text(value) if value != {} else "(empty)"))

    for key, value in section.items():
        walk(value, f"{prefix}.{key}")
    return rows, tables


def _size(num_bytes: Optional[int]) -> str:
    if num_bytes is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024  # type: ignore[assignment]
    return f"{num_bytes} B"  # pragma: no cover


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _groups_text(counts: Mapping[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{name}: {format_number(n)} ({100 * n / total:.1f}%)" for name, n in counts.items())


def _balance_text(split: Mapping[str, Any]) -> str:
    balance = split.get("class_balance")
    if not balance:
        return "n/a"
    return ", ".join(f"{name}: {100 * share:.1f}%" for name, share in balance.items())


def summary_line(card: Mapping[str, Any]) -> str:
    """One line: ``3 of 4 standards met; 1 not met: privacy.epsilon``."""
    summary = card["summary"]
    if not summary["standards"]:
        return "No standards declared."
    text = f"{summary['met']} of {summary['standards']} standards met"
    failed = [s["name"] for s in card["standards"] if s["status"] == "not_met"]
    missing = [s["name"] for s in card["standards"] if s["status"] == "not_measured"]
    if failed:
        text += f"; {len(failed)} not met: {', '.join(failed)}"
    if missing:
        text += f"; {len(missing)} not measured: {', '.join(missing)}"
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
            f"  [{_VERDICT[s['status']]:^12}] {s['name']:<{width}} = {format_number(s['value'], precise=True)}  (required {_requirement(s)})"
        )
    return "\n".join(lines)


def _requirement(entry: Mapping[str, Any]) -> str:
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


def _fact_rows(card: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
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
            ("Epochs", format_number(training["epochs"])),
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


def _config_text(config: Any) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


# ------------------------------------------------------------------------------------- Markdown
def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as GitHub-flavoured Markdown; figures link to the copies next to the card."""
    out = [f"# {card['title']}", ""]
    out += [
        f"Written by lightning-trust {card['generator']['version']} (model card schema {card['schema_version']}) "
        f"at {card['created']}, after `{card['stage']}`.",
        "",
        "## Standards",
        "",
    ]
    summary = card["summary"]
    if summary["standards"]:
        verdict = "All standards met." if summary["all_met"] else "Standards NOT met."
        out += [f"**{verdict}** {summary_line(card)}", ""]
        out += _md_table(
            ["Standard", "Required", "Measured", "Verdict"],
            [[f"`{s['name']}`", _requirement(s), format_number(s["value"], precise=True), f"{_MD_MARK[s['status']]} {_VERDICT[s['status']]}"]
             for s in card["standards"]],
        )  # fmt: skip
    else:
        out.append("No standards declared.")
    out.append("")
    facts = _fact_rows(card)
    out += ["## Model", ""] + _md_table(["", ""], [list(r) for r in facts["Model"]]) + [""]
    out += ["## Data", ""] + _md_data(card["data"])
    out += ["## Training", ""] + _md_table(["", ""], [list(r) for r in facts["Training"]]) + [""]
    out += ["## Final metrics", ""]
    own, others = split_metrics(card["metrics"])
    if own:
        out += _md_table(["Metric", "Value"], [[f"`{k}`", format_number(v)] for k, v in own.items()]) + [""]
    if others:
        out += [f"<details><summary>{len(others)} metrics logged by the callbacks</summary>", ""]
        out += _md_table(["Metric", "Value"], [[f"`{k}`", format_number(v)] for k, v in others.items()])
        out += ["", "</details>", ""]
    if not card["metrics"]:
        out += ["No metrics logged.", ""]
    figures = _figures_by_section(card)
    for name, section in card["sections"].items():
        out += [f"## {section_title(name)}", ""]
        rows, tables = section_rows(section, name)
        if rows:
            out += _md_table(["Name", "Value"], [[f"`{k}`", v] for k, v in rows]) + [""]
        for table_name, columns, body, total in tables:
            out += [f"`{table_name}`:", ""] + _md_table(columns, body) + [""]
            if total > len(body):
                out += [f"({total - len(body)} more rows in model_card.json.)", ""]
        for figure in figures.get(name, []):
            out += [f"![{figure['key']}]({figure['file']})" if figure["data"] else f"(figure `{figure['key']}` was missing)", ""]
    out += ["## Packages", ""]
    out += _md_table(["Package", "Version"], [[k, v] for k, v in card["training"]["packages"].items()]) + [""]
    if card["training"].get("config"):
        out += ["## Configuration", "", "```yaml", _config_text(card["training"]["config"]), "```", ""]
    return "\n".join(out)


def _md_data(data: Mapping[str, Any]) -> list[str]:
    out = []
    if data.get("datamodule"):
        out += [f"DataModule: `{data['datamodule']}`", ""]
    if data["splits"]:
        out += _md_table(
            ["Split", "Samples", "Class balance"],
            [[name, format_number(s["size"]), _balance_text(s)] for name, s in data["splits"].items()],
        ) + [""]
    if data["groups"]:
        out += ["Groups in the training split:", ""]
        out += _md_table(
            ["Column", "Role", "Group sizes"],
            [[f"`{name}`", g["role"], _groups_text(g["counts"])] for name, g in data["groups"].items()],
        ) + [""]
    return out or ["No data facts.", ""]


def _figures_by_section(card: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for figure in card["figures"]:
        grouped.setdefault(figure["section"], []).append(figure)
    return grouped


# ------------------------------------------------------------------------------------- HTML
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
tr.not_met td{background:#ffebe9}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px;margin-top:10px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff}
figure img{width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12.5px;margin-top:4px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.grid2 td:first-child{white-space:nowrap}
.scroll{max-height:420px;overflow:auto}
pre{background:var(--bg);padding:10px;border-radius:6px;overflow:auto;font-size:12.5px}
details summary{cursor:pointer;font-weight:600}
.headline{max-width:760px}.headline td:first-child{white-space:nowrap;width:45%}
.evidence{display:grid;grid-template-columns:minmax(0,1fr) 400px;gap:18px;align-items:start}
.evidence .headline{min-width:0}.evidence .headline td:first-child{white-space:normal;overflow-wrap:anywhere;width:62%}
.evidence .figures{grid-template-columns:repeat(auto-fill,minmax(300px,1fr));margin-top:0}
.evidence .headline td{font-size:12.5px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]], raw: bool = False, row_classes: Optional[list[str]] = None) -> str:
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
        missed = summary["not_met"] + summary["not_measured"]
        badge = (
            f'<div class="badge bad">{missed} of {summary["standards"]} standards not met'
            f'<small>{summary["met"]} met</small></div>'
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(card['title'])}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f'<header><div><h1>{_e(card["title"])}</h1><div class="meta">Written by lightning-trust '
        f'{_e(card["generator"]["version"])} (model card schema {_e(card["schema_version"])}) at '
        f'{_e(card["created"])}, after <code>{_e(card["stage"])}</code>.</div></div>{badge}</header>',
    ]
    # standards
    parts.append('<section id="standards"><h2>Standards</h2>')
    if card["standards"]:
        parts.append(f"<p>{_e(summary_line(card))}</p>")
        rows = [
            [f"<code>{_e(s['name'])}</code>", _e(_requirement(s)), f'<span class="num">{_e(format_number(s["value"], precise=True))}</span>',
             f'<span class="pill {s["status"]}">{_e(_VERDICT[s["status"]])}</span>']
            for s in card["standards"]
        ]  # fmt: skip
        parts.append(_html_table(["Standard", "Required", "Measured", "Verdict"], rows, raw=True,
                                 row_classes=[s["status"] for s in card["standards"]]))  # fmt: skip
    else:
        parts.append("<p>No standards declared.</p>")
    parts.append("</section>")
    # facts
    facts = _fact_rows(card)
    own, others = split_metrics(card["metrics"])
    metrics_html = ""
    if own:
        metrics_html += _html_table(["Metric", "Value"], [[f"<code>{_e(k)}</code>", _e(format_number(v))] for k, v in own.items()], raw=True)
    if others:
        metrics_html += (
            f"<details><summary>{len(others)} metrics logged by the callbacks</summary><div class=scroll>"
            + _html_table(["Metric", "Value"], [[f"<code>{_e(k)}</code>", _e(format_number(v))] for k, v in others.items()], raw=True)
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
    figures = _figures_by_section(card)
    for name, section in card["sections"].items():
        parts.append(f'<section id="section-{_e(name)}"><h2>{_e(section_title(name))}</h2>')
        gallery = ""
        for figure in figures.get(name, []):
            if figure["data"]:
                gallery += (
                    f'<figure><img class="card-figure" data-key="{_e(figure["key"])}" alt="{_e(figure["key"])}" '
                    f'src="data:{figure["media_type"]};base64,{figure["data"]}"><figcaption>{_e(figure["key"])}'
                    "</figcaption></figure>"
                )
            else:
                gallery += f"<figure><figcaption>figure {_e(figure['key'])} was missing</figcaption></figure>"
        headline = [
            [f"<code>{_e(name)}.{_e(k)}</code>", _e(_value_text(v))]
            for k, v in section.items() if not isinstance(v, (Mapping, list, tuple))
        ][:_HEADLINE_ROWS]  # fmt: skip
        numbers = _html_table(["", ""], headline, raw=True) if headline else ""
        if gallery and numbers:
            parts.append(f'<div class="evidence"><div class="figures">{gallery}</div><div class="headline">{numbers}</div></div>')
        elif gallery:
            parts.append(f'<div class="figures">{gallery}</div>')
        elif numbers:
            parts.append(f'<div class="headline">{numbers}</div>')
        rows, tables = section_rows(section, name)
        inner = ""
        if rows:
            inner += _html_table(["Name", "Value"], [[f"<code>{_e(k)}</code>", _e(v)] for k, v in rows], raw=True)
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
        parts.append(f"<details><summary>Configuration</summary><pre>{_e(_config_text(card['training']['config']))}</pre></details>")
    parts.append("</section></main></body></html>")
    return "\n".join(parts) + "\n"


def _html_data(data: Mapping[str, Any]) -> str:
    out = ""
    if data.get("datamodule"):
        out += f"<p class=meta>DataModule <code>{_e(data['datamodule'])}</code></p>"
    if data["splits"]:
        out += _html_table(
            ["Split", "Samples", "Class balance"],
            [[name, format_number(s["size"]), _balance_text(s)] for name, s in data["splits"].items()],
        )
    if data["groups"]:
        out += "<h3>Groups in the training split</h3>" + _html_table(
            ["Column", "Role", "Group sizes"],
            [[name, g["role"], _groups_text(g["counts"])] for name, g in data["groups"].items()],
        )
    return out or "<p>No data facts.</p>"


# ------------------------------------------------------------------------------------- diff
def diff_cards(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers and verdicts that differ between two cards (``after`` minus ``before``)."""
    a = flatten_numbers(addressable(before))
    b = flatten_numbers(addressable(after))
    changed = [
        {"name": k, "before": a[k], "after": b[k], "delta": b[k] - a[k]} for k in sorted(set(a) & set(b)) if a[k] != b[k]
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


def render_diff_markdown(diff: Mapping[str, Any], before_label: str = "before", after_label: str = "after") -> str:
    """The diff as Markdown: verdict changes first, then every changed number."""
    out = [f"# Model card diff: {before_label} -> {after_label}", ""]
    out += ["## Standards", ""]
    if diff["standards"]:
        out += _md_table(
            ["Standard", before_label, after_label, "Change"],
            [[f"`{s['name']}`",
              f"{format_number(s['before_value'])} ({_VERDICT.get(s['before'], 'absent')})",
              f"{format_number(s['after_value'])} ({_VERDICT.get(s['after'], 'absent')})",
              "same" if s["before"] == s["after"] else f"{_VERDICT.get(s['before'], 'absent')} -> {_VERDICT.get(s['after'], 'absent')}"]
             for s in diff["standards"]],
        )  # fmt: skip
    else:
        out.append("No standards declared in either card.")
    out += ["", f"## Changed numbers ({len(diff['changed'])})", ""]
    if diff["changed"]:
        out += _md_table(
            ["Name", before_label, after_label, "Delta"],
            [[f"`{c['name']}`", format_number(c["before"]), format_number(c["after"]), f"{c['delta']:+.4g}"] for c in diff["changed"]],
        )  # fmt: skip
    else:
        out.append("None.")
    for kind in ("added", "removed"):
        if diff[kind]:
            out += ["", f"## Only {'after' if kind == 'added' else 'before'} ({len(diff[kind])})", ""]
            out += [f"- `{name}`" for name in diff[kind]]
    return "\n".join(out) + "\n"
