"""Pictures and HTML of attributions: ranked feature importance, image heatmaps, token highlights.

Token highlights use Captum's ``format_word_importances``. Image heatmaps are |attribution| in a
colormap blended over the image, tiled in one mosaic (cheap enough to draw every epoch).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import Tensor

from lightning_trust.core import new_figure


def importance_figure(names: Sequence[str], scores: Sequence[float], title: str) -> Any:
    """A horizontal bar chart of the ranked scores, most important on top."""
    k = len(names)
    fig = new_figure(figsize=(6.5, 0.8 + 0.28 * k))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(k)[::-1]
    ax.barh(y, list(scores), color="#3b7dd8")
    ax.set_yticks(y)
    ax.set_yticklabels(list(names), fontsize=8)
    ax.set_xlabel("mean |attribution|")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def heatmap_grid(rgb: np.ndarray, captions: Sequence[str], title: str, cols: int = 8) -> Any:
    """One figure tiling the per-sample overlays (:func:`overlays`) with their captions.

    Drawn as a single mosaic image (one axes), which keeps it cheap enough to run every epoch.
    """
    n, h, w, _ = rgb.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pad = max(1, h // 8)
    mosaic = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad, 3))
    for i in range(n):
        r, c = divmod(i, cols)
        mosaic[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = rgb[i]
    fig = new_figure(figsize=(1.3 * cols, 1.45 * rows + 0.3))
    ax = fig.add_axes((0, 0, 1, 0.92 if rows > 1 else 0.85))
    ax.imshow(mosaic.clip(0, 1), interpolation="nearest")
    for i, caption in enumerate(captions[:n]):
        r, c = divmod(i, cols)
        ax.text(c * (w + pad) + w / 2 - 0.5, r * (h + pad) - 0.6, caption, ha="center", va="bottom", fontsize=6)
    ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return fig


def overlays(images: Tensor, attributions: Tensor, alpha: float = 0.6) -> np.ndarray:
    """Per-sample RGB overlays (N, H, W, 3) in [0, 1]: |attribution| (summed over channels, scaled to
    its 99th percentile per sample) in the ``inferno`` colormap blended over the grey image."""
    from matplotlib import colormaps

    heat = attributions.detach().cpu().float().abs().sum(dim=1).numpy()
    scale = np.percentile(heat.reshape(len(heat), -1), 99, axis=1).reshape(-1, 1, 1)
    heat = np.clip(heat / np.maximum(scale, 1e-12), 0, 1)
    grey = images.detach().cpu().float().mean(dim=1).numpy()
    lo, hi = grey.min(axis=(1, 2), keepdims=True), grey.max(axis=(1, 2), keepdims=True)
    grey = (grey - lo) / np.maximum(hi - lo, 1e-12)
    colored = colormaps["inferno"](heat)[..., :3]
    return (1 - alpha) * grey[..., None] + alpha * colored


def save_overlays(folder: Path, rgb: np.ndarray, scale: int = 8) -> list[Path]:
    """Write each overlay as ``sample_XX.png`` (nearest-neighbour upscaled so small images are visible)."""
    from matplotlib.image import imsave

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(rgb):
        path = folder / f"sample_{i:02d}.png"
        imsave(path, np.kron(image, np.ones((scale, scale, 1))).clip(0, 1))
        paths.append(path)
    return paths


def token_html(tokens: Sequence[Sequence[str]], scores: np.ndarray, captions: Sequence[str], title: str) -> str:
    """An HTML table, one row per sample, each token highlighted by its attribution (green positive,
    red negative; Captum's ``format_word_importances``), scaled per sample to [-1, 1]."""
    from captum.attr import visualization as viz

    rows = []
    for words, row, caption in zip(tokens, scores, captions):
        peak = float(np.abs(row).max()) or 1.0
        cell = viz.format_word_importances(list(words), (row[: len(words)] / peak).tolist())
        rows.append(f"<tr><td>{html.escape(caption)}</td>{cell}</tr>")
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<h3>{html.escape(title)}</h3><table border='1' style='border-collapse:collapse'>"
        "<tr><th>sample</th><th>tokens</th></tr>" + "".join(rows) + "</table>\n"
    )


def tokens_of(ids: Tensor, vocab: Optional[Any]) -> list[list[str]]:
    """Token strings of an (N, T) id tensor through a ``vocab`` (list indexed by id, or dict token -> id)."""
    lookup: dict[int, str] = {}
    if isinstance(vocab, dict):
        lookup = {int(v): str(k) for k, v in vocab.items()}
    elif isinstance(vocab, (list, tuple)):
        lookup = dict(enumerate(map(str, vocab)))
    return [[lookup.get(int(t), str(int(t))) for t in row] for row in ids.tolist()]
