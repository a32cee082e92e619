import math

import pytest

from lightning_trust.report.standards import (
    Standard,
    flatten_numbers,
    format_number,
    judge,
    parse_standards,
    summarize,
    unknown_message,
)


def test_parse_standards_accepts_min_max_and_both():
    parsed = parse_standards(
        {"privacy.epsilon": {"max": 8}, "metrics.val/acc": {"min": 0.8}, "a.b": {"min": 0, "max": 1}}
    )
    assert parsed == [
        Standard("privacy.epsilon", None, 8.0),
        Standard("metrics.val/acc", 0.8, None),
        Standard("a.b", 0.0, 1.0),
    ]
    assert parsed[0].section == "privacy"
    assert [s.requirement() for s in parsed] == ["<= 8", ">= 0.8", "between 0 and 1"]
    assert parse_standards(None) == []


@pytest.mark.parametrize(
    ("standards", "message"),
    [
        ({"privacy.epsilon": {}}, "mapping with `min` and/or `max`"),
        ({"privacy.epsilon": 8}, "mapping with `min` and/or `max`"),
        ({"privacy.epsilon": {"below": 8}}, "unknown keys ['below']"),
        ({"privacy.epsilon": {"max": "eight"}}, "`max` must be a number"),
        ({"privacy.epsilon": {"max": None}}, "neither `min` nor `max`"),
        ({"privacy.epsilon": {"min": 2, "max": 1}}, "is above `max`"),
        ({".epsilon": {"max": 1}}, "dotted name"),
    ],
)
def test_parse_standards_rejects_bad_specs_with_the_fix(standards, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("`", "`")):
        parse_standards(standards)


def test_flatten_numbers_joins_keys_so_dotted_keys_stay_addressable():
    tree = {
        "robustness": {"robust_accuracy": {"fgsm": {"0.1": 0.7, "0.03": 0.8}}, "attack": "fgsm", "ok": True},
        "explain": {"top_features": [{"feature": "age", "score": 0.5}]},
        "training": {"epochs": 3, "config": {"trainer": {"max_epochs": 3}}, "packages": {"torch": "2"}},
    }
    assert flatten_numbers(tree) == {
        "robustness.robust_accuracy.fgsm.0.1": 0.7,
        "robustness.robust_accuracy.fgsm.0.03": 0.8,
        "explain.top_features.0.score": 0.5,
        "training.epochs": 3,
    }


def test_judge_inclusive_bounds_nan_and_missing():
    numbers = {"a.x": 8.0, "a.nan": math.nan}
    assert judge(Standard("a.x", None, 8), numbers)["status"] == "met"
    assert judge(Standard("a.x", 8, None), numbers)["status"] == "met"
    breach = judge(Standard("a.x", None, 7.5), numbers)
    assert breach == {"name": "a.x", "min": None, "max": 7.5, "value": 8.0, "status": "not_met"}
    assert judge(Standard("a.nan", 0, None), numbers) == {
        "name": "a.nan",
        "min": 0,
        "max": None,
        "value": None,
        "status": "not_met",
    }
    assert judge(Standard("a.y", 0, None), numbers)["status"] == "not_measured"
    entries = [judge(Standard("a.x", None, 8), numbers), breach]
    assert summarize(entries) == {"standards": 2, "met": 1, "not_met": 1, "not_measured": 0, "all_met": False}
    assert summarize([])["all_met"] is True


def test_unknown_message_suggests_close_names_and_lists_all():
    text = unknown_message(["privacy.epsilom"], {"privacy.epsilon": 1.0, "privacy.delta": 1e-5})
    assert "privacy.epsilom (did you mean privacy.epsilon?)" in text
    assert "The run reports these 2 names:\n  privacy.delta\n  privacy.epsilon" in text


def test_format_number_is_compact_and_stable():
    assert [format_number(v) for v in (None, True, 3, 27146, 8.0, 0.123456, 1e-5, 12345.67, math.nan)] == [
        "n/a",
        "true",
        "3",
        "27,146",
        "8",
        "0.1235",
        "1e-05",
        "12,345.7",
        "nan",
    ]
