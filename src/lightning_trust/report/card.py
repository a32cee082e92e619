"""The model card as data: assembling it, its schema, writing the three files, reading one back."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from lightning_trust.core.protocol import FIGURES_KEY
from lightning_trust.core.tensors import to_jsonable
from lightning_trust.report.render_html import render_html
from lightning_trust.report.render_markdown import render_markdown
from lightning_trust.report.standards import (
    FACT_SECTIONS,
    Standard,
    addressable,
    flatten_numbers,
    judge,
    summarize,
)

SCHEMA_VERSION = "1.0"
SCHEMA_FILE = "model_card.schema.json"
CARD_STEM = "model_card"
FIGURES_DIR = "model_card_figures"


def card_schema() -> dict[str, Any]:
    """The JSON Schema of ``model_card.json`` (shipped in the package)."""
    return json.loads((resources.files("lightning_trust.report") / SCHEMA_FILE).read_text())


def validate_card(card: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``card`` does not follow :func:`card_schema` (needs jsonschema)."""
    import jsonschema

    jsonschema.validate(instance=card, schema=card_schema(), cls=jsonschema.Draft202012Validator)


def split_figures(sections: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str, Path]]]:
    """Sections without their ``figures`` entries, and ``(section, name, path)`` of every figure."""
    clean: dict[str, Any] = {}
    figures: list[tuple[str, str, Path]] = []
    for section, report in sections.items():
        report = dict(report or {})
        for name, path in (report.pop(FIGURES_KEY, None) or {}).items():
            figures.append((section, str(name), Path(path)))
        clean[section if section not in FACT_SECTIONS else f"{section}_section"] = to_jsonable(report, strict=True)
    return clean, figures


def embed_figures(figures: list[tuple[str, str, Path]]) -> list[dict[str, Any]]:
    """Card entries for the figures: base64 PNG data (``None`` when the file is missing)."""
    entries = []
    for section, name, path in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{section}_{name}")
        entries.append({
            "key": f"{section}.{name}", "section": section, "name": name,
            "file": f"{FIGURES_DIR}/{safe}.png", "media_type": "image/png", "data": data,
        })  # fmt: skip
    return entries


def assemble_card(
    *,
    title: str,
    stage: str,
    model: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, float],
    sections: dict[str, Any],
    figures: list[dict[str, Any]],
    standards: list[Standard],
    created: Optional[str] = None,
) -> tuple[dict[str, Any], list[str]]:
    """The card dict (JSON round-tripped, as a reader of the file sees it) and the unknown standard names.

    A standard whose number is absent is ``not_measured`` when it is a metric this stage did not log
    (a ``metrics.test/...`` standard after ``fit``, ``metrics.val/...`` in a test-only run); any other
    absent name is returned as unknown.
    """
    from lightning_trust import __version__

    card: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "lightning-trust", "version": __version__},
        "title": title,
        "created": created or datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "stage": stage,
        "model": to_jsonable(model, strict=True),
        "data": data,
        "training": to_jsonable(training, strict=True),
        "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
        "sections": sections,
        "figures": figures,
        "standards": [],
        "summary": {},
    }
    numbers = flatten_numbers(addressable(card))
    entries = [judge(s, numbers) for s in standards]
    unknown = [e["name"] for e in entries if e["status"] == "not_measured" and not e["name"].startswith("metrics.")]
    card["standards"] = entries
    card["summary"] = summarize(entries)
    return json.loads(json.dumps(card)), unknown


def write_card(card: Mapping[str, Any], directory: Union[str, Path]) -> dict[str, Path]:
    """Write ``model_card.json``, ``.md``, ``.html`` and the figure copies into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / f"{CARD_STEM}.json",
        "md": directory / f"{CARD_STEM}.md",
        "html": directory / f"{CARD_STEM}.html",
    }
    paths["json"].write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    write_renders(card, directory)
    return paths


def write_renders(card: Mapping[str, Any], directory: Union[str, Path]) -> dict[str, Path]:
    """(Re)write the Markdown, the HTML and the figure files of ``card`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for figure in card["figures"]:
        if figure["data"]:
            target = directory / figure["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(figure["data"]))
    md = directory / f"{CARD_STEM}.md"
    html_path = directory / f"{CARD_STEM}.html"
    md.write_bytes(render_markdown(card).encode("utf-8"))
    html_path.write_bytes(render_html(card).encode("utf-8"))
    return {"md": md, "html": html_path}


def load_card(path: Union[str, Path]) -> dict[str, Any]:
    """Read a card from ``model_card.json`` or from a folder holding one (the newest under it)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob(f"{CARD_STEM}.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"No {CARD_STEM}.json under {path}; pass the card's JSON file or its run folder.")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a {CARD_STEM}.json written by TrustReport.")
    card = json.loads(path.read_text(encoding="utf-8"))
    version = str(card.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ValueError(
            f"{path} has model card schema {version or '(none)'}; this lightning-trust reads schema {SCHEMA_VERSION}."
        )
    return card
