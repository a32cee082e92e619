"""The card's figures: what a file is (PNG, SVG, an HTML page of coloured tokens), its pixel size,
and the caption every rendering shows under it.

A section lists its figures in its report's ``figures`` dict (name -> path, or a list of paths);
the card embeds each one and shows it in that section with a caption: a known name's
(:data:`CAPTIONS`: ``token_heatmap``, ``patch_heatmap``...), else the name in words. The HTML shows
a picture at no less than its pixel size (never scaled down: the pack draws at 110 dpi, so a 7 pt
label stays 10.7 px), a wide one scrolls sideways in its box.

Example:
    >>> caption("explain", "token_heatmap")
    'Token heatmap: the tokens of each fixed sample, coloured by their attribution'
    >>> caption("fairness", "selection_rate_by_group")
    'Selection rate by group'
    >>> media_type(b"<html><body>...</body></html>", "tokens.html")
    'text/html'
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["CAPTIONS", "caption", "expand_figures", "media_type", "pixel_size"]

_PNG = b"\x89PNG\r\n\x1a\n"

#: Captions of the figures the pack's sections make, by figure name (any section).
CAPTIONS: dict[str, str] = {
    "token_heatmap": "Token heatmap: the tokens of each fixed sample, coloured by their attribution",
    "tokens_html": "Token heatmap: the tokens of each fixed sample, coloured by their attribution",
    "patch_heatmap": "Patch heatmap: each fixed image with its ViT patches coloured by their attribution",
    "heatmaps": "Heatmaps: each fixed sample with its attribution overlaid",
    "feature_importance": "Feature importance: mean |attribution| over the fixed samples",
}


def caption(section: str, name: str) -> str:
    """The caption of figure ``name`` of ``section``: its entry in :data:`CAPTIONS`, else its name in words.

    A list item (``token_heatmap.2``) is captioned as its list's name, with the sample number.
    """
    base, _, index = name.rpartition(".")
    if base and index.isdigit():
        return f"{caption(section, base)} (sample {int(index) + 1})"
    if name in CAPTIONS:
        return CAPTIONS[name]
    words = name.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:] if words else section


def expand_figures(figures: Mapping[str, Any]) -> list[tuple[str, Path]]:
    """``(name, path)`` of a report's ``figures`` dict; a list of paths gives ``name.0``, ``name.1``..."""
    out: list[tuple[str, Path]] = []
    for name, value in figures.items():
        if isinstance(value, (list, tuple)):
            out += [(f"{name}.{i}", Path(item)) for i, item in enumerate(value)]
        else:
            out.append((str(name), Path(value)))
    return out


def media_type(data: bytes, filename: Union[str, Path]) -> Optional[str]:
    """``image/png``, ``image/svg+xml`` or ``text/html`` (an HTML page, such as coloured tokens);
    ``None`` for a file the card cannot show."""
    suffix = Path(filename).suffix.lower()
    if data.startswith(_PNG):
        return "image/png"
    if suffix == ".svg" or data.lstrip()[:5] == b"<svg ":
        return "image/svg+xml"
    if suffix in (".html", ".htm"):
        return "text/html"
    return None


def pixel_size(data: Optional[bytes]) -> Optional[tuple[int, int]]:
    """Width and height of a PNG from its header; ``None`` for anything else."""
    if not data or not data.startswith(_PNG) or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)
