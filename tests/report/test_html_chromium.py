"""The HTML card opens in headless Chromium without errors and its figures render (non-blank regions).

Without a Chromium binary the test skips, saying why, except under CI (the ``CI`` environment
variable set, as .ci/run's machines set it): there Chromium is required and its absence fails.
"""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from lightning_trust.report.browser import dump_dom, find_chromium, screenshot

pytestmark = pytest.mark.slow

# Appended to a copy of the card: records where every figure landed and whether it decoded.
_PROBE = """<script>
window.addEventListener("load", () => {
  const figs = [...document.querySelectorAll("img.card-figure")].map(img => {
    const r = img.getBoundingClientRect();
    return {key: img.dataset.key, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
            natural: img.naturalWidth, complete: img.complete};
  });
  document.body.setAttribute("data-probe", JSON.stringify({figs, height: document.documentElement.scrollHeight}));
});
</script>"""


def _require_chromium() -> None:
    if find_chromium():
        return
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required under CI (Debian package `chromium`; .ci/run installs it)")
    pytest.skip("no headless Chromium here (Debian package `chromium` or $CHROMIUM); required when CI is set")


def test_card_renders_in_headless_chromium_with_visible_figures(run, tmp_path):
    _require_chromium()
    html = run["report"].paths["html"].read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", _PROBE + "</body>"))
    dom, log = dump_dom(probed, width=1280, height=1000)
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, f"Chromium did not render the card:\n{log[-3000:]}"
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    figures = probe["figs"]
    assert [f["key"] for f in figures] == [f["key"] for f in run["fit"]["figures"]]
    assert all(f["complete"] and f["natural"] > 100 and f["w"] > 100 and f["h"] > 50 for f in figures), figures
    # no console errors, no failed resource loads (the card loads nothing)
    problems = [
        line for line in log.splitlines() if "CONSOLE" in line or "net::ERR" in line or "Failed to load" in line
    ]
    assert not problems, problems

    height = int(probe["height"]) + 20
    png = screenshot(run["report"].paths["html"], tmp_path / "card.png", width=1280, height=height)
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (height, 1280)
    for figure in figures:
        x, y, w, h = (round(figure[k]) for k in ("x", "y", "w", "h"))
        region = pixels[y : y + h, x : x + w]
        assert region.size, figure
        # drawn: many distinct colours and ink (bars, axes, text), not a blank or broken-image box
        ink = (region.mean(axis=2) < 200).mean()
        colours = len(np.unique(region.reshape(-1, 3).astype(np.uint8), axis=0))
        assert region.std() > 20 and ink > 0.02 and colours > 50, (figure["key"], region.std(), ink, colours)
        # the bars' red and blue are on screen inside the figure
        red = ((region[..., 0] > 180) & (region[..., 1] < 80) & (region[..., 2] < 80)).sum()
        blue = ((region[..., 2] > 150) & (region[..., 0] < 80)).sum()
        assert red > 100 and blue > 100, (figure["key"], red, blue)
    # the verdict badge in the header is the breach red (#cf222e), top right
    header = pixels[20:140, 800:1260]
    assert (np.abs(header - np.array([207, 34, 46])).sum(axis=2) < 30).sum() > 1000
