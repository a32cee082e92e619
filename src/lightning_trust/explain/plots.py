"""Pictures and HTML of the explain callbacks: ranked feature importance, image heatmaps, token
highlights, robust accuracy per epsilon.

Token highlights use Captum's ``format_word_importances``. Image heatmaps are |attribution| in a
colormap blended over the image, tiled in one mosaic (cheap enough to draw every epoch).

Example:
    >>> fig = importance_figure(["age", "hours-per-week"], [0.4, 0.1], "Top 2 features")
    >>> len(fig.axes)
    1
    >>> import torch
    >>> tokens_of(torch.tensor([[1, 2]]), ["<pad>", "good", "film"])
    [['good', 'film']]
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import Tensor

from lightning_trust.core.output import new_figure, save_figure

__all__ = [
    "draw_explanation",
    "heatmap_grid",
    "importance_figure",
    "overlays",
    "patch_heatmap_figure",
    "robust_accuracy_figure",
    "save_overlays",
    "token_heatmap_figure",
    "token_html",
    "tokens_of",
    "vocab_of",
]


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
    return fig  # laid out when saved (bbox_inches="tight"): a second layout pass costs as much as the drawing


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


def token_html(tokens: Sequence[Sequence[str]], scores: Any, captions: Sequence[str], title: str) -> str:
    """An HTML table, one row per sample, each token highlighted by its attribution (green positive,
    red negative; Captum's ``format_word_importances``), scaled per sample to [-1, 1]."""
    from captum.attr import visualization as viz

    rows = []
    for words, values, caption in zip(tokens, scores, captions):
        row = np.asarray(values, dtype=float)[: len(words)]
        peak = float(np.abs(row).max()) if row.size else 1.0
        cell = viz.format_word_importances(list(words), (row / (peak or 1.0)).tolist())
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


def vocab_of(datamodule: Any) -> Optional[Any]:
    """The datamodule's id -> token table (``vocab``, ``itos`` or ``id_to_token``), or ``None``."""
    for attr in ("id_to_token", "itos", "vocab"):
        found = getattr(datamodule, attr, None)
        if isinstance(found, (list, tuple, dict)):
            return found
    return None


def token_heatmap_figure(
    tokens: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], captions: Sequence[str], title: str
) -> Any:
    """Coloured text: one row per sample, each token on a background by its score (red negative,
    green positive, scaled per sample to the largest magnitude), wrapped to the figure's width."""
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"]
    width, line, font = 11.0, 0.3, 10
    lines: list[list[tuple[str, float]]] = []
    heads: list[int] = []
    for words, row in zip(tokens, scores):
        peak = max((abs(v) for v in row), default=0.0) or 1.0
        heads.append(len(lines))
        current: list[tuple[str, float]] = []
        used = 0.0
        for word, value in zip(words, row):
            cost = 0.1 * (len(word) + 1)
            if current and used + cost > width - 1.6:
                lines.append(current)
                current, used = [], 0.0
            current.append((word, float(value) / peak))
            used += cost
        lines.append(current)
    fig = new_figure(figsize=(width, 0.6 + line * (len(lines) + len(tokens) * 0.3)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    total = 0.6 + line * (len(lines) + len(tokens) * 0.3)
    ax.set_ylim(total, 0)
    ax.axis("off")
    ax.text(0.1, 0.3, title, fontsize=font + 1, va="center", weight="bold")
    y = 0.6
    caption_of = dict(zip(heads, captions))
    for index, pieces in enumerate(lines):
        if index in caption_of:
            y += line * 0.3 if index else 0.0
            ax.text(0.1, y + line / 2, caption_of[index], fontsize=font - 1, va="center", color="#444")
        x = 1.5
        for word, value in pieces:
            ax.text(x, y + line / 2, word, fontsize=font, va="center", family="monospace",
                    bbox={"facecolor": cmap(0.5 + 0.5 * value), "edgecolor": "none", "pad": 1.5})  # fmt: skip
            x += 0.1 * (len(word) + 1)
        y += line
    return fig


def patch_heatmap_figure(images: Tensor, patches: Tensor, captions: Sequence[str], title: str, cols: int = 8) -> Any:
    """Each image with its per-patch attribution (a vision transformer's patch grid) overlaid, one
    panel per sample, the colour scale per sample (``RdBu_r``: red positive, blue negative)."""
    n = len(images)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(1.6 * cols, 1.75 * rows + 0.4))
    h, w = images.shape[-2:]
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        grey = images[i].detach().float().mean(dim=0).numpy()
        heat = patches[i].detach().float().numpy()
        peak = float(np.abs(heat).max()) or 1.0
        ax.imshow(grey, cmap="gray", extent=(0, w, h, 0))
        ax.imshow(heat, cmap="RdBu_r", vmin=-peak, vmax=peak, alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_title(captions[i] if i < len(captions) else "", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _tensorboards(trainer: Any) -> list[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    return [logger for logger in getattr(trainer, "loggers", []) or [] if isinstance(logger, TensorBoardLogger)]


def draw_explanation(
    trainer: Any,
    folder: Path,
    result: Any,
    modality: str,
    title: str,
    top_k: int,
    num_heatmaps: int,
    captions: Sequence[str],
) -> dict[str, str]:
    """Draw an :class:`~lightning_trust.explain.explanation.Explanation` into ``folder`` and the
    loggers: ``feature_importance.png`` (a mean |attribution| map for images, a ranked bar chart
    otherwise), then ``heatmaps.png`` + ``heatmaps/sample_XX.png`` for images or ``tokens.html`` for
    token inputs. Returns ``{figure name: path}``."""
    figures: dict[str, str] = {}
    k = min(top_k, len(result.names))
    top = result.top(k)
    image = modality == "image" and result.input_attributions.ndim == 4
    if image:
        amap = result.importance.reshape(result.input_attributions.shape[1:]).sum(dim=0)
        fig = new_figure(figsize=(3.2, 3.0))
        ax = fig.add_subplot(1, 1, 1)
        shown = ax.imshow(amap.numpy(), cmap="inferno")
        fig.colorbar(shown, ax=ax)
        ax.set_title(f"mean |attribution| ({title})", fontsize=8)
        ax.axis("off")
    else:
        fig = importance_figure([t["feature"] for t in top], [t["score"] for t in top], f"Top {k} features ({title})")
    save_figure(trainer, fig, folder / "feature_importance.png", tag="explain/feature_importance")
    figures["feature_importance"] = str(folder / "feature_importance.png")
    m = min(num_heatmaps, len(result.inputs))
    if image:
        rgb = overlays(result.inputs[:m], result.input_attributions[:m])
        save_figure(trainer, heatmap_grid(rgb, captions, title), folder / "heatmaps.png", tag="explain/heatmaps")
        figures["heatmaps"] = str(folder / "heatmaps.png")
        save_overlays(folder / "heatmaps", rgb)
        for logger in _tensorboards(trainer):
            logger.experiment.add_images("explain/overlays", rgb.astype(np.float32), result.step, dataformats="NHWC")
        if result.patches is not None:
            fig = patch_heatmap_figure(
                result.inputs[:m], result.patches[:m], captions, f"attribution per patch ({title})"
            )
            save_figure(trainer, fig, folder / "patch_heatmap.png", tag="explain/patch_heatmap")
            figures["patch_heatmap"] = str(folder / "patch_heatmap.png")
    elif modality == "text":
        if result.tokens is not None:
            rows = result.token_scores()[:m]
            tokens = [[t["token"] for t in row] for row in rows]
            scores = [[t["score"] for t in row] for row in rows]
        else:
            tokens = tokens_of(result.inputs[:m], vocab_of(getattr(trainer, "datamodule", None)))
            scores = result.input_attributions[:m].float().tolist()
        if result.generated is not None:
            captions = [f"{c} -> {' '.join(g)}" for c, g in zip(captions, result.generated)]
        fig = token_heatmap_figure(tokens, scores, captions, f"token attributions ({title})")
        save_figure(trainer, fig, folder / "token_heatmap.png", tag="explain/token_heatmap")
        figures["token_heatmap"] = str(folder / "token_heatmap.png")
        page = token_html(tokens, scores, captions, title)
        (folder / "tokens.html").write_text(page)
        figures["tokens_html"] = str(folder / "tokens.html")
        for logger in _tensorboards(trainer):
            logger.experiment.add_text("explain/tokens", page, result.step)
    return figures


def robust_accuracy_figure(
    epsilons: Sequence[float], curves: Mapping[str, Sequence[float]], clean: float, title: str
) -> Any:
    """Accuracy against epsilon, one line per attack (``curves[attack]``: accuracy at each epsilon),
    the clean accuracy dashed."""
    fig = new_figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for attack, accuracies in curves.items():
        ax.plot(list(epsilons), list(accuracies), marker="o", label=attack.upper())
    ax.axhline(clean, color="grey", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("epsilon")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
