"""The evidence map: every number of a card under the Annex IV point and NIST AI RMF MEASURE item it
serves; topics a run has no number for are "no evidence in this run"; unknown sections are unmapped."""

import json
import re
from pathlib import Path

import jsonschema

from lightning_trust.report import card_schema, render_html, render_markdown
from lightning_trust.report.evidence import NO_EVIDENCE, evidence_map
from lightning_trust.report.regulation import ANNEX_IV, NIST_MEASURE, TOPICS, topic_of
from lightning_trust.report.standards import addressable, flatten_numbers

FIXTURES = Path(__file__).parent / "fixtures"

#: Annex IV of Regulation (EU) 2024/1689: points 1-9, lettered items of points 1 (a-h) and 2 (a-h).
_ANNEX_IV_POINTS = {str(p) for p in range(1, 10)} | {f"{p}({c})" for p in (1, 2) for c in "abcdefgh"}
#: NIST AI 100-1 Table 3: MEASURE 1.1-1.3, 2.1-2.13, 3.1-3.3, 4.1-4.3.
_NIST_MEASURE = {f"MEASURE {c}.{s}" for c, n in ((1, 3), (2, 13), (3, 3), (4, 3)) for s in range(1, n + 1)}


def _card(name="model_card_1_1.json"):
    return json.loads((FIXTURES / name).read_text())


def _topics(emap):
    return {t["topic"]: t for t in emap["topics"]}


def test_headings_are_real_annex_iv_points_and_nist_measure_subcategories():
    assert set(ANNEX_IV) <= _ANNEX_IV_POINTS
    assert set(NIST_MEASURE) <= _NIST_MEASURE
    for topic in TOPICS.values():
        assert set(topic.annex_iv) <= set(ANNEX_IV) and set(topic.nist) <= set(NIST_MEASURE), topic
    # the brief's kinds of evidence and the items they serve
    assert TOPICS["data_governance"].annex_iv[0] == "2(d)"
    assert "2(g)" in TOPICS["accuracy_per_group"].annex_iv and TOPICS["accuracy_per_group"].nist == ("MEASURE 2.11",)
    assert TOPICS["privacy"].nist == ("MEASURE 2.10",) and TOPICS["adversarial_robustness"].nist == ("MEASURE 2.7",)
    assert TOPICS["explainability"].annex_iv[0] == "2(e)" and TOPICS["explainability"].nist == ("MEASURE 2.9",)
    assert "3" in TOPICS["monitoring"].annex_iv


def test_every_number_of_a_real_card_lands_in_exactly_one_topic():
    card = _card()
    emap = evidence_map(card)
    numbers = flatten_numbers(addressable(card), nulls=True)
    listed = [n for t in emap["topics"] for n in t["numbers"]] + emap["unmapped"]["numbers"]
    assert sorted(listed) == sorted(numbers)  # each once
    topics = _topics(emap)
    assert topics["privacy"]["status"] == "evidence" and "privacy.epsilon" in topics["privacy"]["numbers"]
    assert topics["privacy"]["standards"] == [{"name": "privacy.epsilon", "status": "met"}]
    assert "fairness.by_group.sex.Female.accuracy" in topics["accuracy_per_group"]["numbers"]
    assert "metrics.val/acc" in topics["accuracy"]["numbers"]
    assert "evaluation.ood_gap.accuracy" in topics["robustness"]["numbers"]
    assert "data.groups.sex.counts.Female" in topics["data_governance"]["numbers"]
    # this run had no attack, audit or conformal step: said so, nothing invented
    for absent in ("adversarial_robustness", "privacy_audit", "uncertainty"):
        assert topics[absent]["status"] == "no_evidence" and topics[absent]["numbers"] == []
    assert topics["monitoring"]["status"] == "no_value"  # explain.drift reported without a value
    assert emap["unmapped"] == {"sections": [], "numbers": []}
    # headings listed are those the evidence serves: nothing for the absent topics only
    assert "MEASURE 2.7" not in emap["headings"]["nist_ai_rmf"] and "2(h)" in emap["headings"]["annex_iv"]


def test_new_sections_are_named_and_unknown_ones_listed_unmapped():
    card = _card()
    card["sections"]["privacy_audit"] = {"epsilon_lower_bound": 0.4, "accountant_epsilon": 3.0, "canaries": 1000}
    card["sections"]["uncertainty"] = {
        "conformal": {"coverage": 0.91, "mean_set_size": 1.3, "by_group": {"sex": {"Female": {"coverage": 0.89}}}},
        "calibration": {"ece_before": 0.08, "ece_after": 0.03},
        "shift": {"per_domain": {"Asia": {"mmd": 0.02, "p_value": 0.4}}},
    }
    card["sections"]["mycheck"] = {"score": 1.0}
    topics = _topics(evidence_map(card))
    assert topics["privacy_audit"]["numbers"] == [
        "privacy_audit.epsilon_lower_bound", "privacy_audit.accountant_epsilon", "privacy_audit.canaries",
    ]  # fmt: skip
    assert topics["privacy_audit"]["annex_iv"] == ["2(g)", "2(h)"]
    assert topics["uncertainty"]["numbers"] == [
        "uncertainty.conformal.coverage", "uncertainty.conformal.mean_set_size",
        "uncertainty.calibration.ece_before", "uncertainty.calibration.ece_after",
    ]  # fmt: skip
    assert "uncertainty.conformal.by_group.sex.Female.coverage" in topics["accuracy_per_group"]["numbers"]
    assert topics["monitoring"]["status"] == "evidence"
    assert "uncertainty.shift.per_domain.Asia.mmd" in topics["monitoring"]["numbers"]
    assert evidence_map(card)["unmapped"] == {"sections": ["mycheck"], "numbers": ["mycheck.score"]}
    assert topic_of("evaluation.conformal.coverage_gap") == "uncertainty"
    assert topic_of("evaluation.per_domain.Asia.accuracy") == "robustness"


def test_the_renderings_show_the_mapping_and_the_gaps(tmp_path):
    card = _card()
    card["evidence_map"] = evidence_map(card)
    card["schema_version"] = "1.2"
    jsonschema.validate(card, card_schema(), cls=jsonschema.Draft202012Validator)
    md = render_markdown(card)
    section = md.split("## Regulatory mapping", 1)[1].split("\n## ", 1)[0]
    assert (
        "| Differential privacy guarantee (accountant's epsilon, delta) | 2(d), 2(h) | MEASURE 2.10 | 14 numbers"
        in section
    )
    assert "privacy.epsilon = 2.99818" in section and "standards: 1 of 1 met" in section
    assert re.search(
        r"\| Empirical privacy audit .* \| 2\(g\), 2\(h\) \| MEASURE 2.10, MEASURE 2.7 \| no evidence in this run",
        section,
    )
    assert section.count(NO_EVIDENCE) == 3 + 1  # three rows and the note
    assert "| NIST AI RMF 1.0 | MEASURE 2.11 | Fairness and bias are evaluated and results are documented. |" in section
    html = render_html(card)
    assert '<section id="regulation"><h2>Regulatory mapping</h2>' in html
    assert html.count('<tr class="absent">') == 3
    assert "Regulation (EU) 2024/1689" in html and "NIST AI 100-1" in html
