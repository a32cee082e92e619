"""MkDocs hook: the pages' generated parts, read from the code, never copied by hand.

Markers in a page (HTML comments, so the Markdown reads fine on GitHub too) are replaced:

* ``<!-- lt:sections -->``: the report sections (:data:`lightning_trust.core.protocol.SECTIONS`).
* ``<!-- lt:compatibility -->``: every callback's declared capabilities and every refused pair.
* ``<!-- lt:area NAME -->``: for each public callback of ``lightning_trust.NAME`` (found by
  :func:`lightning_trust.registry.callback_classes`): its capabilities, what it refuses and who
  refuses it, and its ``logged_keys`` / ``report_keys`` ClassVars.
* ``<!-- lt:benchmarks -->``: every ``benchmarks/results/*.json`` as tables.

A reporting callback (one with a ``report_section``) without ``logged_keys`` or ``report_keys``
fails the build, naming the class. For local work while areas are adding them, set
``LT_DOCS_ALLOW_MISSING_KEYS=1``: the build then notes each missing declaration on the page
and in the log (at INFO level, so ``mkdocs build --strict`` still passes). CI never sets it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.lightning_trust")
ROOT = Path(__file__).resolve().parents[2]
ALLOW_MISSING = os.environ.get("LT_DOCS_ALLOW_MISSING_KEYS", "") not in ("", "0", "false")
_MARKER = re.compile(r"<!--\s*lt:(\w+)(?:\s+([\w.-]+))?\s*-->")
_missing: list[str] = []


# ----------------------------------------------------------------------------------- reading the code
def _classes() -> dict[str, type]:
    from lightning_trust.registry import callback_classes

    return callback_classes()


def _declared(cls: type, attr: str) -> Any:
    """A class's declaration; one that is a property (it depends on the arguments) is read from an
    instance built with the defaults, else returned as the property itself."""
    value = getattr(cls, attr, None)
    if isinstance(value, property):
        try:
            return getattr(cls(), attr)
        except Exception:
            return value
    return value


def _capabilities(cls: type) -> Any:
    return _declared(cls, "capabilities") or frozenset()


def _refuses(cls: type) -> Any:
    return _declared(cls, "refuses") or {}


def _is_reporting(cls: type) -> bool:
    return any("report_section" in base.__dict__ for base in cls.__mro__) or callable(getattr(cls, "report", None))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _capability_names(value: Any) -> str:
    if isinstance(value, property):
        return "depends on its arguments (see the class)"
    return ", ".join(f"`{c.name}`" for c in sorted(value, key=lambda c: c.name)) or "none"


# ----------------------------------------------------------------------------------- generators
def sections() -> str:
    from lightning_trust.core.protocol import SECTIONS

    return _table(["Section", "Written by"], [[f"`{name}`", text] for name, text in SECTIONS.items()])


def _refused_pairs(classes: Mapping[str, type]) -> list[list[str]]:
    rows = []
    for name, cls in classes.items():
        refuses = _refuses(cls)
        if isinstance(refuses, property):
            continue
        for capability, reason in refuses.items():
            for other, other_cls in classes.items():
                caps = _capabilities(other_cls)
                if other != name and not isinstance(caps, property) and capability in caps:
                    rows.append([f"`{name}`", f"`{other}`", f"`{capability.name}`", reason])
    return rows


def compatibility() -> str:
    from lightning_trust.core.compat import Capability

    classes = _classes()
    out = ["**Capabilities** (what a callback does to training):", ""]
    out.append(_table(["Capability", "Meaning"], [[f"`{c.name}`", c.value] for c in Capability]))
    out += ["", "**Declared by each callback:**", ""]
    out.append(_table(
        ["Callback", "Area", "Capabilities", "Refuses beside it"],
        [[f"`{name}`", cls.__module__.split(".")[1], _capability_names(_capabilities(cls)),
          _capability_names(frozenset(_refuses(cls))) if not isinstance(_refuses(cls), property)
          else _capability_names(_refuses(cls))]
         for name, cls in classes.items()],
    ))  # fmt: skip
    pairs = _refused_pairs(classes)
    out += ["", "**Refused combinations** (the setup check raises `IncompatibleCallbacksError` naming both):", ""]
    out.append(
        _table(["Callback", "cannot train beside", "because it", "Why, and the fix"], pairs) if pairs else "None."
    )
    return "\n".join(out)


def _keys_table(cls: type, attr: str, what: str) -> str:
    keys = getattr(cls, attr, None)
    if keys is None:
        message = f"{cls.__module__}.{cls.__name__} declares no `{attr}` ClassVar ({what})."
        if not ALLOW_MISSING:
            raise PluginError(
                f"docs: {message} Every reporting callback declares `logged_keys` and `report_keys` "
                "(metric/key -> one-line meaning); set LT_DOCS_ALLOW_MISSING_KEYS=1 only for local builds."
            )
        _missing.append(f"{cls.__name__}.{attr}")
        log.info("docs (allowed by LT_DOCS_ALLOW_MISSING_KEYS): %s", message)
        return f'!!! warning "Not declared yet"\n    `{cls.__name__}.{attr}` is missing.'
    if not keys:
        return "None."
    return _table(["Key", "Meaning"], [[f"`{k}`", v] for k, v in keys.items()])


def area(name: str) -> str:
    from lightning_trust.registry import areas_of

    classes = _classes()
    names = areas_of(classes).get(name)
    if not names:
        raise PluginError(f"docs: no public callback found in lightning_trust.{name} (marker lt:area {name}).")
    out = []
    for cls_name in names:
        cls = classes[cls_name]
        out += [f"### `{cls_name}`", ""]
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if doc:
            out += [doc, ""]
        out += [f"**Capabilities:** {_capability_names(_capabilities(cls))}.", ""]
        refuses = _refuses(cls)
        if isinstance(refuses, property):
            out += ["**Refuses:** depends on its arguments (see the class).", ""]
        elif refuses:
            out += ["**Refuses** (callbacks that declare):", ""]
            out += [f"- `{c.name}`: {reason}" for c, reason in refuses.items()] + [""]
        refused_by = [row for row in _refused_pairs(classes) if row[1] == f"`{cls_name}`"]
        if refused_by:
            out += ["**Refused by:**", ""] + [f"- {row[0]} ({row[2]}): {row[3]}" for row in refused_by] + [""]
        if _is_reporting(cls) or hasattr(cls, "logged_keys") or hasattr(cls, "report_keys"):
            section = cls.__dict__.get("report_section", getattr(cls, "report_section", None))
            if isinstance(section, str):
                out += [f"**Report section:** `{section}` (or the callback's `name`).", ""]
            out += [
                "**Logged** (through the Trainer's loggers):",
                "",
                _keys_table(cls, "logged_keys", "logged metrics"),
                "",
            ]
            out += ["**Report keys** (`report()`, addressable by standards):", ""]
            out += [_keys_table(cls, "report_keys", "report() keys"), ""]
    return "\n".join(out)


def _benchmark_tables(name: str, data: Any) -> list[str]:
    from lightning_trust.report.rows import section_rows

    if not isinstance(data, Mapping):
        data = {"result": data}
    rows, tables = section_rows(data, name)
    out = []
    if rows:
        out += [_table(["Name", "Value"], [[f"`{k}`", v] for k, v in rows]), ""]
    for table_name, columns, body, total in tables:
        out += [f"`{table_name}`:", "", _table(columns, body), ""]
        if total > len(body):
            out += [f"({total - len(body)} more rows in the JSON file.)", ""]
    return out


def benchmarks() -> str:
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if not files:
        return (
            '!!! note "No results recorded yet"\n'
            "    Run the benchmarks (`python benchmarks/<area>.py`, see `benchmarks/README.md`); each writes\n"
            "    `benchmarks/results/<area>.json`. Commit those files and this page shows them."
        )
    out = []
    for path in files:
        out += [f"## `{path.name}`", ""]
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PluginError(f"docs: {path} is not JSON ({err}).") from err
        out += _benchmark_tables(path.stem, data)
    return "\n".join(out)


GENERATORS: dict[str, Callable[..., str]] = {
    "sections": sections,
    "compatibility": compatibility,
    "area": area,
    "benchmarks": benchmarks,
}


# ----------------------------------------------------------------------------------- MkDocs events
_IDENTIFIER = re.compile(r"^[A-Za-z_][\w.]*$")


class _SubscriptsAreNotReferences(logging.Filter):
    """Docstrings index dicts in prose and in examples (``report()["after"]["accuracy"]``), which
    Markdown reads as a reference link ``[text][ref]``; autorefs then warns that ``"accuracy"`` is
    no cross-reference target. Only those warnings are dropped: a target that is a Python name
    (``lightning_trust.core.Capability``) and is missing still fails the strict build."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = re.search(r"Could not find cross-reference target '(.*)'", record.getMessage())
        return match is None or bool(_IDENTIFIER.match(match.group(1)))


def on_config(config: Any) -> Any:
    import mkdocs_autorefs  # noqa: F401  (its loggers exist once it is imported)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("mkdocs.plugins.mkdocs_autorefs"):
            logging.getLogger(name).addFilter(_SubscriptsAreNotReferences())
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind not in GENERATORS:
            raise PluginError(f"docs: unknown marker lt:{kind} in {page.file.src_path}.")
        return GENERATORS[kind](arg) if arg else GENERATORS[kind]()

    return _MARKER.sub(replace, markdown)


def on_post_build(config: Any) -> None:
    if _missing:
        log.info("docs: ClassVars still missing (allowed locally): %s", ", ".join(sorted(set(_missing))))
