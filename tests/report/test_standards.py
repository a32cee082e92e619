import math

import pytest

from lightning_trust.report.standards import (
    Standard,
    flatten_numbers,
    format_number,
    judge,
    metric_stage,
    missing_metric_status,
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
        "reason": "no value (undefined, NaN or not computed)",
    }
    assert judge(Standard("a.y", 0, None), numbers)["status"] == "not_measured"
    assert judge(Standard("a.y", 0, None), numbers, missing="unknown")["status"] == "unknown"
    entries = [judge(Standard("a.x", None, 8), numbers), breach]
    assert summarize(entries) == {
        "standards": 2, "met": 1, "not_met": 1, "not_measured": 0, "unknown": 0, "all_met": False,
    }  # fmt: skip


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf])
def test_a_number_without_a_value_never_meets_a_standard_whatever_the_bounds(value):
    # an undefined fairness difference (fairlearn's empty denominator) is NaN in the report, null in the card
    for standard in (Standard("f.d", None, 0.1), Standard("f.d", 0.0, None), Standard("f.d", -1e300, 1e300)):
        entry = judge(standard, {"f.d": value})
        assert entry["status"] == "not_met" and entry["value"] is None, entry


def test_nulls_are_addressable_names_when_asked():
    tree = {"fairness": {"equalized_odds_difference": None, "flags": [{"group": "a", "metric": "tpr"}]}}
    assert flatten_numbers(tree) == {}
    assert flatten_numbers(tree, nulls=True) == {"fairness.equalized_odds_difference": None}


@pytest.mark.parametrize(
    ("name", "stage"),
    [("val/acc", "validation"), ("val_loss", "validation"), ("valid-acc", "validation"), ("train_loss_epoch", "train"),
     ("test/acc", "test"), ("acc_test", "test"), ("loss/val", "validation"), ("fairness/dp", None), ("accuracy", None),
     ("vall/acc", None)],
)  # fmt: skip
def test_metric_stage_reads_the_first_or_last_word(name, stage):
    assert metric_stage(name) == stage


def test_missing_metric_is_unknown_once_it_could_have_been_logged():
    logged = ["val/acc", "val/loss", "train_loss"]
    fit = ("train", "validation")
    assert missing_metric_status("val/accc", logged, fit) == "unknown"  # validation ran: misspelt
    assert missing_metric_status("test/acc", logged, fit) == "not_measured"  # test has not run yet
    assert missing_metric_status("test/acc", logged, (*fit, "test")) == "unknown"
    assert missing_metric_status("vall/acc", logged, fit) == "unknown"  # no stage word, but close to val/acc
    assert missing_metric_status("fairness/dp", logged, fit) == "not_measured"  # may be logged by a test
    assert missing_metric_status("fairness/dp", logged, (*fit, "test")) == "unknown"
    assert missing_metric_status("val/acc", [], ("train",)) == "not_measured"  # no validation ran
    assert summarize([])["all_met"] is True


def test_unknown_message_suggests_close_names_and_lists_all():
    text = unknown_message(["privacy.epsilom"], {"privacy.epsilon": 1.0, "privacy.delta": 1e-5})
    assert "privacy.epsilom (did you mean privacy.epsilon?)" in text
    assert "Fix the names. The run reports these 2 names:\n  privacy.delta\n  privacy.epsilon" in text
    assert "metrics.val/accc (did you mean metrics.val/acc?)" in unknown_message(
        ["metrics.val/accc"], ["metrics.val/acc", "metrics.val/loss", "metrics.train_loss"]
    )


def test_format_number_is_one_stable_text_with_six_significant_digits():
    values = (None, True, 3, 27146, 8.0, 0.123456789, 1e-5, 12345.67, 123456.78, 2.9996612, math.nan)
    assert [format_number(v) for v in values] == [
        "n/a", "true", "3", "27,146", "8", "0.123457", "1e-05", "12,345.7", "123,456.8", "2.99966", "nan",
    ]  # fmt: skip
