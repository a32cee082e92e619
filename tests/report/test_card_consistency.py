"""One card, one story: every section names the same final epoch, a number has one text in every
table and rendering, figures keep readable text, and the explain section shows token and patch heatmaps."""

import base64
import json
import re

import pytest
import torch
from PIL import Image

from lightning_trust.core import artifact_dir, new_figure, save_figure
from lightning_trust.demo import TabularMLP
from lightning_trust.evaluation import CrossDomainEvaluation
from lightning_trust.explain import AdversarialRobustness, Attribution
from lightning_trust.fairness import FairnessMetrics
from lightning_trust.report import TrustReport, diff_cards, render_diff_markdown, render_html, render_markdown
from lightning_trust.report.standards import format_number
from tests.report.helpers import LIMITS, FakeSection
from tests.support import trainer

#: The smallest text a card figure may show, in CSS pixels.
MIN_TEXT_PX = 10.0


@pytest.fixture(scope="module")
def several(adult, tmp_path_factory):
    """A real three-epoch fit with four sections that record an epoch, then a test."""
    tmp = tmp_path_factory.mktemp("several")
    torch.manual_seed(0)
    fairness = FairnessMetrics(sensitive_features=["sex", "race"])
    callbacks = [
        Attribution(num_samples=16, progress=False),
        AdversarialRobustness(attacks=["fgsm"], epsilons=[0.1], num_samples=32, progress=False),
        fairness,
        CrossDomainEvaluation(domain_key="native_region", in_domain=["United-States"], metrics=["accuracy"]),
    ]
    report = TrustReport(standards={"fairness.demographic_parity_difference": {"max": 1.0}}, verbose=False)
    t = trainer(tmp, [*callbacks, report], **{**LIMITS, "max_epochs": 3})
    model = TabularMLP()
    t.fit(model, adult)
    after_fit = json.loads(report.paths["json"].read_text())
    t.test(model, adult, verbose=False)
    return {"fit": after_fit, "test": report.card, "report": report, "fairness": fairness, "dir": tmp}


@pytest.mark.slow
def test_every_section_reports_the_same_final_epoch(several):
    for when in ("fit", "test"):
        card = several[when]
        assert card["training"]["epochs"] == 3 and card["training"]["final_epoch"] == 2
        epochs = {name: section["epoch"] for name, section in card["sections"].items() if "epoch" in section}
        # explanations and attacks run at fit end, fairness and evaluation at the last validation (then test)
        assert set(epochs) == {"explain", "robustness", "fairness", "evaluation"}, epochs
        assert set(epochs.values()) == {2}, (when, epochs)
    assert "| Epochs | 3 (final epoch 2) |" in render_markdown(several["fit"])


def _png_fonts(figure) -> list[float]:
    from matplotlib.text import Text

    return [t.get_fontsize() for t in figure.findobj(Text) if t.get_text().strip() and t.get_visible()]


@pytest.mark.slow
def test_figures_are_shown_at_no_less_than_their_pixel_size(several):
    card = several["test"]
    html = render_html(card)
    assert "figure img{display:block;max-width:none;height:auto}" in html
    pictures = [f for f in card["figures"] if f["media_type"] == "image/png" and f["data"]]
    assert any(f["key"].startswith("fairness.by_group") for f in pictures)
    for figure in pictures:
        png = base64.b64decode(figure["data"])
        width, height = Image.open(__import__("io").BytesIO(png)).size
        assert (figure["width"], figure["height"]) == (width, height)
        assert f'data-key="{figure["key"]}" alt="{figure["caption"]}" width="{width}" height="{height}"' in html
        if width > 560:  # a wide figure takes a whole row (and scrolls sideways if wider than the page)
            assert re.search(
                rf'<figure class="wide"><div class="shot"><img class="card-figure" data-key="{re.escape(figure["key"])}"',
                html,
            )


def _probe(html_path, tmp_path):
    from lightning_trust.report.browser import dump_dom

    probe = """<script>window.addEventListener("load", () => {
      const figs = [...document.querySelectorAll("img.card-figure")].map(img => ({key: img.dataset.key,
        w: img.getBoundingClientRect().width, natural: img.naturalWidth}));
      document.body.setAttribute("data-probe", JSON.stringify(figs));});</script>"""
    probed = tmp_path / "probed.html"
    probed.write_text(html_path.read_text().replace("</body>", probe + "</body>"))
    dom, log = dump_dom(probed, width=1280, height=1000)
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, log[-3000:]
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.slow
def test_fairness_figure_text_is_readable_in_the_rendered_card(several, tmp_path):
    from lightning_trust.fairness.frame import group_bar_figure
    from lightning_trust.report.browser import find_chromium

    if not find_chromium():
        pytest.skip("needs headless Chromium (Debian package `chromium`)")
    fairness, card = several["fairness"], several["test"]
    shown = {f["key"]: f for f in _probe(several["report"].paths["html"], tmp_path)}
    for metric in fairness.metrics:
        if metric == "count":
            continue
        key = f"fairness.by_group_{metric}"  # the validation figure: sex, race and their panels side by side
        entry = next(f for f in card["figures"] if f["key"] == key)
        dpi = Image.open(__import__("io").BytesIO(base64.b64decode(entry["data"]))).info["dpi"][0]
        # the figure as the fairness section draws it: its titles, tick labels and legend in points
        drawn = group_bar_figure(fairness.results["validation"], metric, "validation", fairness.min_group_size)
        smallest_pt = min(_png_fonts(drawn))
        scale = shown[key]["w"] / shown[key]["natural"]
        assert scale >= 0.999, (key, shown[key])  # never scaled down
        assert smallest_pt * dpi / 72 * scale >= MIN_TEXT_PX, (key, smallest_pt, dpi, scale)


def test_a_number_has_the_same_text_in_every_table_and_rendering(adult, tmp_path):
    epsilon = 2.9996612345
    privacy = FakeSection("privacy", {"epsilon": epsilon, "delta": 1e-5}, figure=None)
    standards = {
        "privacy.epsilon": {"max": 3},
        "model.size_bytes": {"max": 10**9},
        "training.duration_s": {"max": 3600},
        "data.splits.train.class_balance.1": {"max": 1},
    }
    report = TrustReport(standards=standards, verbose=False)
    trainer(tmp_path, [privacy, report], **LIMITS).fit(TabularMLP(), adult)
    card = report.card
    md, html = render_markdown(card), render_html(card)
    before = json.loads(json.dumps(card))
    before["sections"]["privacy"]["epsilon"] = 2.5
    for s in before["standards"]:
        if s["name"] == "privacy.epsilon":
            s["value"] = 2.5
    diff = render_diff_markdown(diff_cards(before, card))
    assert format_number(epsilon) == "2.99966"
    # the standards table, the regulatory mapping's privacy row and the privacy table
    assert md.count("2.99966") == 3 and html.count("2.99966") >= 3
    assert "privacy.epsilon = 2.99966" in md.split("## Regulatory mapping", 1)[1].split("\n## ", 1)[0]
    assert "| `privacy.epsilon` | <= 3 | 2.99966 | ✅ met |" in md and "| `privacy.epsilon` | 2.99966 |" in md
    assert "| `privacy.epsilon` | 2.5 | 2.99966 | +0.499661 |" in diff and "2.99966 (met)" in diff
    for entry in card["standards"]:  # each standard's number is written once, the same way, in its fact table
        text = format_number(entry["value"])
        assert md.count(text) >= 2 and html.count(text) >= 2, (entry["name"], text)
        measured = md.split("## Packages", 1)[0]  # (versions and the configuration are not measurements)
        for other in re.findall(r"\d[\d,]*\.\d+(?![\d%])", measured):  # no table rounds the same number another way
            assert other == text or float(other.replace(",", "")) != pytest.approx(entry["value"], rel=1e-3), (
                entry["name"], other, text,
            )  # fmt: skip


class HeatmapSection(FakeSection):
    """An explain section as the token and ViT attributions report it: a coloured-text page and patch pictures."""

    def on_fit_end(self, trainer, pl_module):
        folder = artifact_dir(trainer, "explain")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokens.html").write_text(
            '<div class="tokens"><span style="background:rgba(214,39,40,0.8)">good</span> '
            '<span style="background:rgba(31,119,180,0.4)">film</span></div>'
        )
        patches = []
        for i in range(2):
            fig = new_figure(figsize=(2, 2))
            fig.add_subplot().imshow([[0, 1], [1, 0]], cmap="coolwarm")
            path = folder / f"patches_{i}.png"
            save_figure(trainer, fig, path)
            patches.append(str(path))
        self.figures = {"token_heatmap": str(folder / "tokens.html"), "patch_heatmap": patches}

    def report(self):
        return {**self.numbers, "figures": self.figures}


def test_explain_section_shows_token_and_patch_heatmaps_with_captions(adult, tmp_path):
    explain = HeatmapSection("explain", {"method": "layer_integrated_gradients", "epoch": 0}, figure=None)
    report = TrustReport(verbose=False)
    trainer(tmp_path, [explain, report], **LIMITS).fit(TabularMLP(), adult)
    card = report.card
    figures = {f["key"]: f for f in card["figures"]}
    assert list(figures) == ["explain.token_heatmap", "explain.patch_heatmap.0", "explain.patch_heatmap.1"]
    tokens = figures["explain.token_heatmap"]
    assert tokens["media_type"] == "text/html" and tokens["file"].endswith(".html")
    assert tokens["caption"].startswith("Token heatmap: the tokens of each fixed sample")
    assert figures["explain.patch_heatmap.1"]["caption"].endswith("(sample 2)")
    md = report.paths["md"].read_text()
    explain_md = md.split("## Explain", 1)[1].split("\n## ", 1)[0]
    assert f"[open the page]({tokens['file']})" in explain_md and tokens["caption"] in explain_md
    assert "![explain.patch_heatmap.0](model_card_figures/explain_patch_heatmap_0.png)" in explain_md
    assert (tmp_path / tokens["file"]).read_text().startswith('<div class="tokens">')
    html = report.paths["html"].read_text()
    explain_html = html.split('<section id="section-explain">', 1)[1].split("</section>", 1)[0]
    assert 'sandbox="" srcdoc="&lt;div class=&quot;tokens&quot;&gt;&lt;span style=' in explain_html
    assert explain_html.count('<img class="card-figure"') == 2
    assert explain_html.count("<figcaption>") == 3 and "Patch heatmap" in explain_html
    assert "<script" not in html
