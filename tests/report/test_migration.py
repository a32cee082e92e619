"""Cards of earlier schemas (stored real cards: 1.0 from the foundation job, 1.1 from the Adult job)
are upgraded in memory when read, validate against the current schema, render, and diff."""

import base64
import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from lightning_trust.cli import main as cli_main
from lightning_trust.report import SCHEMA_VERSION, card_schema, diff_cards, load_card, render_html, render_markdown
from lightning_trust.report.figures import caption, pixel_size

FIXTURES = Path(__file__).parent / "fixtures"
V = jsonschema.Draft202012Validator


@pytest.mark.parametrize("old", ["1.0", "1.1"])
def test_an_old_card_is_a_valid_card_of_its_own_schema_and_upgrades_to_the_current_one(old):
    path = FIXTURES / f"model_card_{old.replace('.', '_')}.json"
    raw = json.loads(path.read_text())
    own_schema = json.loads((FIXTURES / f"model_card_{old.replace('.', '_')}.schema.json").read_text())
    jsonschema.validate(raw, own_schema, cls=V)  # the fixture really is a card of that version
    assert raw["schema_version"] == old and "evidence_map" not in raw
    with pytest.raises(jsonschema.ValidationError, match="evidence_map"):
        jsonschema.validate({**raw, "schema_version": SCHEMA_VERSION}, card_schema(), cls=V)

    card = load_card(path)
    assert SCHEMA_VERSION == "1.2" and card["schema_version"] == "1.2" and card["migrated_from"] == old
    jsonschema.validate(card, card_schema(), cls=V)
    assert json.loads(path.read_text()) == raw  # the file is left as it is
    # nothing measured again: the numbers, verdicts and facts are the file's
    for key in ("metrics", "sections", "standards", "model", "data", "training"):
        assert card[key] == raw[key]
    figure = card["figures"][0]
    assert figure["caption"] == caption(figure["section"], figure["name"])
    assert (figure["width"], figure["height"]) == pixel_size(base64.b64decode(figure["data"]))
    assert card["summary"]["unknown"] == 0
    topics = {t["topic"]: t for t in card["evidence_map"]["topics"]}
    assert topics["privacy"]["status"] == "evidence" and topics["privacy_audit"]["status"] == "no_evidence"


def test_a_1_0_card_renders_markdown_and_html_with_its_numbers():
    card = load_card(FIXTURES / "model_card_1_0.json")
    md, html = render_markdown(card), render_html(card)
    assert "(model card schema 1.2, read from a 1.0 card)" in md and "read from a 1.0 card" in html
    for s in card["standards"]:
        assert f"| `{s['name']}` |" in md
    assert "## Regulatory mapping" in md and '<section id="regulation">' in html
    assert "| Epochs | 3 |" in md  # a 1.0 card names no final epoch: none is made up
    key = card["figures"][0]["key"]
    assert f"![{key}]({card['figures'][0]['file']})" in md
    assert f'data-key="{key}" alt="{card["figures"][0]["caption"]}" width="' in html


def test_the_report_cli_rerenders_and_diffs_old_cards(tmp_path, capsys):
    old = tmp_path / "old" / "model_card.json"
    old.parent.mkdir()
    shutil.copy(FIXTURES / "model_card_1_0.json", old)
    before = old.read_bytes()
    assert cli_main(["report", str(old)]) == 0
    assert old.read_bytes() == before
    assert "read from a 1.0 card" in (old.parent / "model_card.md").read_text()
    assert (old.parent / "model_card.html").is_file()
    assert cli_main(["report", str(old), str(FIXTURES / "model_card_1_1.json")]) == 0
    out = capsys.readouterr().out
    diff = diff_cards(load_card(old), load_card(FIXTURES / "model_card_1_1.json"))
    assert diff["changed"] and f"## Changed numbers ({len(diff['changed'])})" in out
    eps = next(c for c in diff["changed"] if c["name"] == "privacy.epsilon")
    assert eps["after"] == pytest.approx(2.998176550158973)


def test_other_majors_and_malformed_versions_are_refused(tmp_path):
    for version in ("2.0", "1.x", ""):
        path = tmp_path / "model_card.json"
        path.write_text(json.dumps({"schema_version": version}))
        with pytest.raises(ValueError, match="reads schema 1.x"):
            load_card(path)
