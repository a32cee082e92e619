"""The model card as data: assembling it, its schema, writing the three files, reading one back."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from lightning_trust.core.protocol import FIGURES_KEY
from lightning_trust.core.tensors import to_jsonable
from lightning_trust.report.budget_notes import budget_note
from lightning_trust.report.evidence import evidence_map
from lightning_trust.report.figures import caption, expand_figures, media_type, pixel_size
from lightning_trust.report.migrate import CURRENT, upgrade_card
from lightning_trust.report.render_html import render_html
from lightning_trust.report.render_markdown import render_markdown
from lightning_trust.report.standards import (
    FACT_SECTIONS,
    Standard,
    addressable,
    flatten_numbers,
    judge,
    missing_metric_status,
    summarize,
)

#: The schema this version writes; :func:`load_card` upgrades cards of earlier 1.x versions in memory.
SCHEMA_VERSION = CURRENT
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
    """Sections without their ``figures`` entries, and ``(section, name, path)`` of every figure
    (a list of paths under one name gives ``name.0``, ``name.1``...)."""
    clean: dict[str, Any] = {}
    figures: list[tuple[str, str, Path]] = []
    for section, report in sections.items():
        report = dict(report or {})
        for name, path in expand_figures(report.pop(FIGURES_KEY, None) or {}):
            figures.append((section, name, path))
        clean[section if section not in FACT_SECTIONS else f"{section}_section"] = to_jsonable(report, strict=True)
    return clean, figures


def embed_figures(figures: list[tuple[str, str, Path]]) -> list[dict[str, Any]]:
    """Card entries for the figures: the file base64 (``None`` when missing or not a PNG, SVG or
    HTML file), its media type, pixel size (PNG) and caption."""
    entries = []
    for section, name, path in figures:
        raw = path.read_bytes() if path.is_file() else None
        kind = media_type(raw, path) if raw is not None else None
        suffix = {"image/png": ".png", "image/svg+xml": ".svg", "text/html": ".html"}.get(kind or "", ".png")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{section}_{name}")
        entry: dict[str, Any] = {
            "key": f"{section}.{name}", "section": section, "name": name,
            "file": f"{FIGURES_DIR}/{safe}{suffix}", "media_type": kind or "image/png",
            "data": base64.b64encode(raw).decode("ascii") if raw is not None and kind else None,
            "caption": caption(section, name),
        }  # fmt: skip
        size = pixel_size(raw)
        if size is not None:
            entry["width"], entry["height"] = size
        entries.append(entry)
    return entries


def assemble_card(
    *,
    title: str,
    stage: str,
    model: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
    metrics: Mapping[str, Optional[float]],
    sections: dict[str, Any],
    figures: list[dict[str, Any]],
    standards: list[Standard],
    created: Optional[str] = None,
    ran_stages: Iterable[str] = ("train", "validation"),
    license: Optional[str] = None,
) -> tuple[dict[str, Any], list[str]]:
    """The card dict (JSON round-tripped, as a reader of the file sees it) and the unknown standard names.

    A metric logged as NaN is in the card as ``null`` (a standard on it is not met). A standard on a
    name the card does not hold is ``not_measured`` when it is a metric that can still be logged (a
    ``metrics.test/...`` standard after ``fit``: :func:`~lightning_trust.report.standards.missing_metric_status`
    with the stages that ran, ``ran_stages``); every other absent name is ``unknown`` and returned.
    The ``evidence_map`` (:func:`~lightning_trust.report.evidence.evidence_map`) is built last, from
    the card's numbers and verdicts; ``license`` (a Hub license id) is kept when given.
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
        "metrics": {k: v if v is not None and math.isfinite(v) else None for k, v in metrics.items()},
        "sections": sections,
        "figures": figures,
        "standards": [],
        "summary": {},
    }
    numbers = flatten_numbers(addressable(card), nulls=True)
    ran = set(ran_stages)
    entries = []
    for s in standards:
        missing = "unknown"
        if s.section == "metrics":
            missing = missing_metric_status(s.name.split(".", 1)[1], card["metrics"], ran)
        entry = judge(s, numbers, missing)
        note = budget_note(sections, s.name) if entry["status"] in ("met", "not_met") else None
        if note is not None:
            entry["note"] = note
        entries.append(entry)
    card["standards"] = entries
    card["summary"] = summarize(entries)
    if license is not None:
        card["license"] = license
    card["evidence_map"] = evidence_map(card)
    return json.loads(json.dumps(card)), [e["name"] for e in entries if e["status"] == "unknown"]


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
    write_figures(card, directory)
    md = directory / f"{CARD_STEM}.md"
    html_path = directory / f"{CARD_STEM}.html"
    md.write_bytes(render_markdown(card).encode("utf-8"))
    html_path.write_bytes(render_html(card).encode("utf-8"))
    return {"md": md, "html": html_path}


def write_figures(card: Mapping[str, Any], directory: Union[str, Path]) -> None:
    """Write the copies of the card's figures (the files its Markdown links to) under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for figure in card["figures"]:
        if figure["data"]:
            target = directory / figure["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(figure["data"]))


def load_card(path: Union[str, Path]) -> dict[str, Any]:
    """Read a card from ``model_card.json`` or from a folder holding one (the newest under it).

    A card of an earlier 1.x schema is upgraded in memory (:func:`~lightning_trust.report.migrate.upgrade_card`:
    ``migrated_from`` names its version); a card of another major version is refused."""
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
    if not re.fullmatch(r"[0-9]+\.[0-9]+", version) or version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ValueError(
            f"{path} has model card schema {version or '(none)'}; this lightning-trust reads schema "
            f"{SCHEMA_VERSION.split('.')[0]}.x (writes {SCHEMA_VERSION})."
        )
    return upgrade_card(card)
