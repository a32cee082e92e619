"""A standard judged on a number an overhead budget measured on part of the samples carries a note in the
card (JSON, Markdown, HTML and the console summary); a number on all samples carries none."""

import json
from pathlib import Path

from lightning_trust.report.budget_notes import budget_note
from lightning_trust.report.card import assemble_card, validate_card
from lightning_trust.report.render_html import render_html
from lightning_trust.report.render_markdown import render_markdown
from lightning_trust.report.rows import standards_summary
from lightning_trust.report.standards import parse_standards

SECTIONS = {
    "robustness": {"truncated": True, "samples": 127, "samples_available": 256, "robust_accuracy": {"fgsm": 0.41}},
    "evaluation": {
        "extra_samples": {
            "samples": 64,
            "truncated": True,
            "corruptions": {"samples": 64, "samples_available": 270, "truncated": True},
            "domains": {},
        },
        "summary": {"worst": {"accuracy": 0.7}},
    },
    "explain": {
        "aggregated_over": {"samples": 16, "of": 32, "numbers": ["infidelity", "sensitivity_max"]},
        "infidelity": 0.02,
        "num_samples": 32,
    },
    "fairness": {"demographic_parity_difference": 0.05},
}


def test_each_budget_shape_names_the_samples_and_only_its_numbers():
    assert budget_note(SECTIONS, "robustness.robust_accuracy.fgsm").startswith("measured on 127 of 256 samples")
    assert "corruptions 64 of 270" in budget_note(SECTIONS, "evaluation.summary.worst.accuracy")
    assert budget_note(SECTIONS, "explain.infidelity").startswith("measured on 16 of 32 samples")
    assert budget_note(SECTIONS, "explain.num_samples") is None  # not an aggregate over the explained samples
    assert budget_note(SECTIONS, "fairness.demographic_parity_difference") is None
    assert budget_note(SECTIONS, "metrics.val/acc") is None
    whole = {"robustness": {"truncated": False, "samples": 256, "samples_available": 256, "robust_accuracy": {}}}
    assert budget_note(whole, "robustness.robust_accuracy.fgsm") is None


def test_the_card_carries_the_note_in_every_rendering():
    standards = parse_standards(
        {"robustness.robust_accuracy.fgsm": {"min": 0.4}, "fairness.demographic_parity_difference": {"max": 0.1}}
    )
    real = json.loads((Path(__file__).parent / "fixtures" / "model_card_1_1.json").read_text())  # a real run's facts
    card, unknown = assemble_card(
        title="t", stage="fit", model=real["model"], data=real["data"], training=real["training"], metrics={},
        sections=SECTIONS, figures=[], standards=standards,
    )  # fmt: skip
    assert unknown == []
    validate_card(card)
    robust, fair = card["standards"]
    assert robust["status"] == "met" and robust["value"] == 0.41 and "127 of 256" in robust["note"]
    assert "note" not in fair
    assert "- `robustness.robust_accuracy.fgsm`: measured on 127 of 256 samples" in render_markdown(card)
    assert "<code>robustness.robust_accuracy.fgsm</code>: measured on 127 of 256 samples" in render_html(card)
    summary = standards_summary(card).splitlines()
    assert summary[1].endswith("[measured on 127 of 256 samples: the overhead budget cut the final pass "
                               "(max_overhead=None measures all)]") and "[" not in summary[2].split(")")[-1]  # fmt: skip
