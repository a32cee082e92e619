"""Standards on logged metrics: a misspelt name is an unknown name with its close matches, refused as
soon as the logged names are known (before training when the sanity check runs); a number without a
value (NaN) is never met."""

import json
import math

import lightning.pytorch as pl
import pytest

from lightning_trust.cli import main as cli_main
from lightning_trust.demo import TabularMLP
from lightning_trust.report import TrustReport, UnknownStandardError, load_card, render_markdown
from tests.report.helpers import LIMITS, FakeSection
from tests.support import trainer


class Steps(pl.Callback):
    """Optimizer steps taken and training epochs finished when the run stopped."""

    def __init__(self) -> None:
        self.steps = 0
        self.epochs = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1


def _fit(adult, tmp_path, standards, sanity=2, **kw):
    report = TrustReport(standards=standards, fail_on_breach=True, verbose=False)
    steps = Steps()
    limits = {**LIMITS, **kw}
    t = trainer(tmp_path, [steps, report], num_sanity_val_steps=sanity, **limits)
    return report, steps, t


def test_misspelt_validation_metric_is_refused_after_the_sanity_check_before_any_step(adult, tmp_path):
    _report, steps, t = _fit(adult, tmp_path, {"metrics.val/accc": {"min": 0.8}})
    with pytest.raises(UnknownStandardError) as err:
        t.fit(TabularMLP(), adult)
    text = str(err.value)
    assert "after the sanity check" in text
    assert "metrics.val/accc (did you mean metrics.val/acc?)" in text
    assert "\n  metrics.val/acc\n" in text and "Fix the names" in text
    assert steps.steps == 0 and t.global_step == 0
    assert not (tmp_path / "model_card.json").exists()  # refused, not reported as "not measured"


def test_without_a_sanity_check_it_is_refused_at_the_first_validation(adult, tmp_path):
    _report, steps, t = _fit(adult, tmp_path, {"metrics.val/accc": {"min": 0.8}}, sanity=0, max_epochs=3)
    with pytest.raises(UnknownStandardError, match=r"metrics\.val/accc \(did you mean metrics\.val/acc\?\)"):
        t.fit(TabularMLP(), adult)
    assert steps.steps == LIMITS["limit_train_batches"] and steps.epochs == 0  # one epoch's steps, no more


def test_a_validation_metric_never_logged_is_refused_at_the_first_validation(adult, tmp_path):
    # not close to any logged name, so the sanity check lets it pass; the first full validation does not log it
    _report, steps, t = _fit(adult, tmp_path, {"metrics.val/f1": {"min": 0.5}}, max_epochs=3)
    with pytest.raises(UnknownStandardError, match=r"after validation.*\n  metrics\.val/f1\n"):
        t.fit(TabularMLP(), adult)
    assert steps.epochs == 0


def test_a_misspelt_training_metric_is_refused_after_the_first_epoch(adult, tmp_path):
    _report, steps, t = _fit(adult, tmp_path, {"metrics.train/los_epoch": {"max": 1.0}}, max_epochs=3)
    with pytest.raises(
        UnknownStandardError, match=r"metrics\.train/los_epoch \(did you mean metrics\.train/loss_epoch"
    ):
        t.fit(TabularMLP(), adult)
    assert steps.epochs == 1


def test_a_test_metric_is_not_measured_after_fit_and_judged_after_test(adult, tmp_path):
    report, _steps, t = _fit(adult, tmp_path, {"metrics.test/acc": {"min": 0.0}, "metrics.val/acc": {"min": 0.0}})
    model = TabularMLP()
    t.fit(model, adult)
    verdicts = {s["name"]: s["status"] for s in report.card["standards"]}
    assert verdicts == {"metrics.test/acc": "not_measured", "metrics.val/acc": "met"}
    assert report.exit_code == 1  # under fail_on_breach, not measured is not a pass
    t.test(model, adult, verbose=False)
    assert {s["name"]: s["status"] for s in report.card["standards"]} == {
        "metrics.test/acc": "met",
        "metrics.val/acc": "met",
    }
    assert report.exit_code == 0


def test_an_unknown_name_found_when_the_card_is_written_is_in_the_card_and_fails_the_cli(adult, tmp_path, capsys):
    # no stage word and not close to a logged name: it could still come from a test, until the test has run
    report, _steps, t = _fit(adult, tmp_path, {"metrics.accuracy": {"min": 0.5}})
    model = TabularMLP()
    t.fit(model, adult)
    assert report.card["standards"][0]["status"] == "not_measured"
    with pytest.raises(UnknownStandardError, match=r"card written to .*\n  metrics\.accuracy\n"):
        t.test(model, adult, verbose=False)
    card = load_card(report.paths["json"])
    assert card["standards"][0]["status"] == "unknown" and card["summary"]["unknown"] == 1
    assert "| `metrics.accuracy` | >= 0.5 | n/a | ❓ unknown name |" in render_markdown(card)
    assert "1 unknown (names the run does not report): metrics.accuracy" in render_markdown(card)
    capsys.readouterr()
    assert cli_main(["report", str(report.paths["json"]), "-o", str(tmp_path / "again"), "--fail-on-breach"]) == 1
    assert "[unknown name] metrics.accuracy" in capsys.readouterr().out


class LogNaN(pl.Callback):
    """Logs an undefined validation metric (NaN), as a metric over an empty group would be."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("val/undefined", math.nan)


def test_numbers_without_a_value_are_not_met_never_met_nor_unknown(adult, tmp_path):
    fairness = FakeSection(
        "fairness",
        {"equalized_odds_difference": math.nan, "demographic_parity_difference": 0.05,
         "flags": [{"feature": "sex", "group": "Female", "metric": "true_positive_rate", "reason": "no positives"}]},
        figure=None,
    )  # fmt: skip
    standards = {
        "fairness.equalized_odds_difference": {"max": 0.1},
        "fairness.demographic_parity_difference": {"max": 0.1},
        "metrics.val/undefined": {"min": 0.0, "max": 1.0},
    }
    report = TrustReport(standards=standards, fail_on_breach=True, verbose=False)
    trainer(tmp_path, [fairness, LogNaN(), report], **LIMITS).fit(TabularMLP(), adult)
    card = json.loads(report.paths["json"].read_text())
    by_name = {s["name"]: s for s in card["standards"]}
    assert by_name["fairness.equalized_odds_difference"]["status"] == "not_met"
    assert by_name["fairness.equalized_odds_difference"]["value"] is None
    assert by_name["fairness.demographic_parity_difference"]["status"] == "met"
    assert by_name["metrics.val/undefined"]["status"] == "not_met"
    assert card["metrics"]["val/undefined"] is None  # strict JSON: NaN is null
    assert report.exit_code == 1
