"""The card's ``evidence_map``: every reported number under the EU AI Act Annex IV point and NIST AI RMF
MEASURE subcategory it serves (table: :mod:`lightning_trust.report.regulation`).

Built from the card's own numbers and verdicts only: a topic the run reports no number for is
``no_evidence`` ("no evidence in this run"), one whose numbers all lack a value (NaN) is
``no_value``, and a number no rule names is listed as unmapped.

Example:
    >>> card = {"model": {}, "data": {}, "training": {}, "metrics": {"val/acc": 0.9},
    ...         "sections": {"privacy": {"epsilon": 2.0}}, "standards": []}
    >>> topics = {t["topic"]: t for t in evidence_map(card)["topics"]}
    >>> topics["privacy"]["status"], topics["privacy"]["numbers"], topics["privacy"]["annex_iv"]
    ('evidence', ['privacy.epsilon'], ['2(d)', '2(h)'])
    >>> topics["accuracy_per_group"]["status"]
    'no_evidence'
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from lightning_trust.report.regulation import ANNEX_IV, NIST_MEASURE, SOURCES, TOPICS, topic_of
from lightning_trust.report.standards import addressable, flatten_numbers, format_number

__all__ = ["NO_EVIDENCE", "evidence_map", "evidence_rows", "heading_rows", "mapping_note"]

#: What the renderings say for a topic the run has no number for.
NO_EVIDENCE = "no evidence in this run"
_EXAMPLES = 3  # numbers named in a rendered row
_BOOKKEEPING = frozenset(
    {"epoch", "step", "steps", "seconds", "num_samples", "state_bytes", "dataset_size", "world_size"}
)


def evidence_map(card: Mapping[str, Any]) -> dict[str, Any]:
    """Every number of ``card`` (as standards address them, nulls included) by topic, with the
    headings each topic serves, the standards declared on its numbers, and the unmapped names."""
    numbers = flatten_numbers(addressable(card), nulls=True)
    by_topic: dict[str, list[str]] = {name: [] for name in TOPICS}
    unmapped: list[str] = []
    for name in numbers:
        key = topic_of(name)
        (by_topic[key] if key is not None else unmapped).append(name)
    verdicts = {s["name"]: s["status"] for s in card.get("standards", [])}
    topics: list[dict[str, Any]] = []
    for key, topic in TOPICS.items():
        names = by_topic[key]
        topics.append({
            "topic": key, "title": topic.title,
            "annex_iv": list(topic.annex_iv), "nist_ai_rmf": list(topic.nist),
            "status": _status(names, numbers),
            "sections": sorted({n.split(".", 1)[0] for n in names}),
            "numbers": names,
            "standards": [{"name": n, "status": verdicts[n]} for n in names if n in verdicts],
            "provided_by": topic.provided_by,
        })  # fmt: skip
    served = [TOPICS[t["topic"]] for t in topics if t["status"] == "evidence"]
    used_annex = sorted({a for t in served for a in t.annex_iv}, key=_annex_order)
    used_nist = sorted({m for t in served for m in t.nist}, key=_nist_order)
    return {
        "sources": dict(SOURCES),
        "topics": topics,
        "unmapped": {
            "sections": sorted({n.split(".", 1)[0] for n in unmapped}),
            "numbers": unmapped,
        },
        "headings": {
            "annex_iv": {a: ANNEX_IV[a] for a in used_annex},
            "nist_ai_rmf": {m: NIST_MEASURE[m] for m in used_nist},
        },
    }


def _status(names: list[str], numbers: Mapping[str, Any]) -> str:
    """``evidence``; ``no_value`` when every number is reported without a value (NaN, undefined); else ``no_evidence``."""
    if not names:
        return "no_evidence"
    return "evidence" if any(numbers[n] is not None for n in names) else "no_value"


def _annex_order(point: str) -> tuple[int, str]:
    head = point.split("(", 1)[0]
    return int(head), point


def _nist_order(item: str) -> tuple[int, ...]:
    return tuple(int(p) for p in item.split()[1].split("."))


def evidence_rows(card: Mapping[str, Any]) -> list[list[str]]:
    """Rows for the renderings: topic, Annex IV points, NIST subcategories, the evidence (how many
    numbers, a few of them with their values, the standards on them) or "no evidence in this run"."""
    emap = card.get("evidence_map") or evidence_map(card)
    values = flatten_numbers(addressable(card), nulls=True)
    rows = []
    for topic in emap["topics"]:
        if topic["status"] == "no_value":
            text = f"{len(topic['numbers'])} numbers reported without a value ({', '.join(topic['sections'])})"
        elif topic["numbers"]:
            first = TOPICS[topic["topic"]].headline if topic["topic"] in TOPICS else ()
            picked = _headline(topic["numbers"], values, {s["name"] for s in topic["standards"]}, first)
            named = ", ".join(f"{n} = {format_number(values.get(n))}" for n in picked)
            text = f"{len(topic['numbers'])} numbers ({', '.join(topic['sections'])}), e.g. {named}"
            if topic["standards"]:
                met = sum(s["status"] == "met" for s in topic["standards"])
                text += f"; standards: {met} of {len(topic['standards'])} met"
        else:
            text = f"{NO_EVIDENCE}; reported by {topic['provided_by']}"
        rows.append([
            topic["title"], ", ".join(topic["annex_iv"]) or "-", ", ".join(topic["nist_ai_rmf"]) or "-", text,
        ])  # fmt: skip
    unmapped = emap["unmapped"]
    if unmapped["numbers"]:
        rows.append([
            f"Not mapped (sections {', '.join(unmapped['sections'])})", "-", "-",
            f"{len(unmapped['numbers'])} numbers no rule of lightning_trust.report.regulation names",
        ])  # fmt: skip
    return rows


def _headline(names: list[str], values: Mapping[str, Any], judged: set[str], first: tuple[str, ...]) -> list[str]:
    """A few numbers to name: those a standard judges, the topic's headline ones (``first``), then
    measured ones before bookkeeping (epoch, step, seconds...), shallow names before per-group tables."""

    def rank(name: str) -> tuple[int, int, int, int, int]:
        bookkeeping = name.rsplit(".", 1)[-1] in _BOOKKEEPING or ".budget." in name
        headline = next((i for i, p in enumerate(first) if fnmatchcase(name, p)), len(first))
        return (name not in judged, values.get(name) is None, headline, bookkeeping, name.count("."))

    return sorted(names, key=rank)[:_EXAMPLES]


def heading_rows(card: Mapping[str, Any]) -> list[list[str]]:
    """``[framework, id, heading]`` for every heading the evidence serves, then the sources."""
    emap = card.get("evidence_map") or evidence_map(card)
    rows = [["EU AI Act Annex IV", f"point {k}", v] for k, v in emap["headings"]["annex_iv"].items()]
    rows += [["NIST AI RMF 1.0", k, v] for k, v in emap["headings"]["nist_ai_rmf"].items()]
    return rows


def mapping_note(card: Mapping[str, Any]) -> str:
    """The sentence above the mapping table: what it is, where it comes from, what it is not."""
    emap = card.get("evidence_map") or evidence_map(card)
    sources = "; ".join(emap["sources"].values())
    return (
        "Every number this card reports, by the EU AI Act Annex IV point and the NIST AI RMF 1.0 MEASURE "
        f'subcategory it serves ({sources}). A row marked "{NO_EVIDENCE}" names evidence this run does not '
        "provide; the mapping documents what was measured, it is not a conformity assessment."
    )
