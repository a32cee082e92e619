"""Reading cards of earlier schema versions: each step upgrades the dict in memory, adding only what
can be derived from the card itself (nothing is measured again, nothing is invented).

- 1.0 -> 1.1: figures get their caption (from the section and figure name) and, for a PNG, its pixel
  size (read from the embedded file); the summary gets ``unknown: 0`` (1.0 had no such verdict).
  ``training.final_epoch`` stays absent: a 1.0 card does not say which epoch its sections name.
- 1.1 -> 1.2: the ``evidence_map`` is built from the card's numbers and verdicts.

The upgraded card names the version it was read from in ``migrated_from``; its file is not rewritten.

Example:
    >>> old = {"schema_version": "1.1", "model": {}, "data": {}, "training": {}, "metrics": {"val/acc": 0.8},
    ...        "sections": {}, "figures": [], "standards": [], "summary": {}}
    >>> card = upgrade_card(old)
    >>> card["schema_version"], card["migrated_from"], "evidence_map" in card, "evidence_map" in old
    ('1.2', '1.1', True, False)
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Mapping
from typing import Any

from lightning_trust.report.evidence import evidence_map
from lightning_trust.report.figures import caption, pixel_size

__all__ = ["CURRENT", "upgrade_card"]

#: The schema version this lightning-trust writes (``lightning_trust.report.card.SCHEMA_VERSION``).
CURRENT = "1.2"


def _minor(version: str) -> int:
    return int(version.split(".")[1])


def _from_1_0(card: dict[str, Any]) -> None:
    for figure in card.get("figures", []):
        figure.setdefault("caption", caption(figure["section"], figure["name"]))
        if figure.get("media_type") == "image/png" and figure.get("data") and "width" not in figure:
            size = pixel_size(base64.b64decode(figure["data"]))
            if size is not None:
                figure["width"], figure["height"] = size
    card.setdefault("summary", {}).setdefault("unknown", 0)


def _from_1_1(card: dict[str, Any]) -> None:
    card["evidence_map"] = evidence_map(card)


#: minor version -> the step that upgrades a card of that version to the next one.
_STEPS: dict[int, Callable[[dict[str, Any]], None]] = {0: _from_1_0, 1: _from_1_1}


def upgrade_card(card: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``card`` upgraded to schema :data:`CURRENT` (the card itself when already current or newer)."""
    version = str(card.get("schema_version", ""))
    if _minor(version) >= _minor(CURRENT):
        return dict(card)
    upgraded = copy.deepcopy(dict(card))
    for minor in range(_minor(version), _minor(CURRENT)):
        _STEPS[minor](upgraded)
    upgraded["schema_version"] = CURRENT
    upgraded["migrated_from"] = version
    return upgraded
