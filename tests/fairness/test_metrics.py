import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equal_opportunity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score

from lightning_trust.core.batch import BatchKeyError
from lightning_trust.fairness import METRICS, FairnessBreachError, FairnessMetrics
from tests.fairness.helpers import LogitModule, SyntheticDataModule, binary_arrays, names, synthetic
from tests.support import trainer

FAIRLEARN_SUMMARIES = {
    "demographic_parity_difference": demographic_parity_difference,
    "demographic_parity_ratio": demographic_parity_ratio,
    "equalized_odds_difference": equalized_odds_difference,
    "equalized_odds_ratio": equalized_odds_ratio,
    "equal_opportunity_difference": equal_opportunity_difference,
    "equal_opportunity_ratio": equal_opportunity_ratio,
}
BASIC = {
    "accuracy": accuracy_score,
    "selection_rate": selection_rate,
    "true_positive_rate": true_positive_rate,
    "false_positive_rate": false_positive_rate,
}


def _validate(tmp_path, data, return_logits=False, **kwargs):
    cb = FairnessMetrics(**kwargs)
    trainer(tmp_path, callbacks=[cb]).validate(
        LogitModule(return_logits=return_logits), SyntheticDataModule(data), verbose=False
    )
    return cb


@pytest.mark.parametrize("return_logits", [False, True])
def test_binary_equals_metricframe(tmp_path, return_logits):
    data = synthetic()
    cb = _validate(tmp_path, data, return_logits, sensitive_features=["sex", "race"], min_group_size=0)
    r = cb.report()
    y_true, y_pred = binary_arrays(data)
    for column in ("sex", "race"):
        sf = names(data, column)
        frame = MetricFrame(metrics=BASIC, y_true=y_true, y_pred=y_pred, sensitive_features=sf)
        for group, row in frame.by_group.iterrows():
            for metric, value in row.items():
                assert r["by_group"][column][group][metric] == value
        for summary, fn in FAIRLEARN_SUMMARIES.items():
            assert r["by_feature"][column][summary] == fn(y_true, y_pred, sensitive_features=sf)
    for summary in FAIRLEARN_SUMMARIES:
        values = [r["by_feature"][c][summary] for c in ("sex", "race")]
        assert r[summary] == (min(values) if summary.endswith("ratio") else max(values))
        assert r["worst_feature"][summary] in ("sex", "race")
    assert r["overall"]["accuracy"] == accuracy_score(y_true, y_pred)
    assert r["num_samples"] == len(y_true)


def test_intersectional_equals_metricframe(tmp_path):
    data = synthetic(n=900)
    cb = _validate(tmp_path, data, sensitive_features=[["sex", "race"]], metrics=list(METRICS), min_group_size=0)
    r = cb.report()
    y_true, y_pred = binary_arrays(data)
    sf = pd.DataFrame({"sex": names(data, "sex"), "race": names(data, "race")})
    frame = MetricFrame(metrics=METRICS, y_true=y_true, y_pred=y_pred, sensitive_features=sf)
    assert len(r["by_group"]["sex*race"]) == 6
    for (sex, race), row in frame.by_group.iterrows():
        cell = r["by_group"]["sex*race"][f"{sex},{race}"]
        assert cell["log_name"] == f"sex={sex},race={race}"
        for metric, value in row.items():
            assert cell[metric] == value
    for summary, fn in FAIRLEARN_SUMMARIES.items():
        assert r[summary] == fn(y_true, y_pred, sensitive_features=sf)


def test_multiclass_one_vs_rest(tmp_path):
    data = synthetic(n=600, classes=4)
    cb = _validate(tmp_path, data, sensitive_features="sex", min_group_size=0)
    r = cb.report()
    y = data["y"].numpy()
    pred = torch.softmax(data["x"], 1).argmax(1).numpy()
    sf = names(data, "sex")
    per_class = {}
    for c in range(4):
        yt, yp = (y == c).astype(int), (pred == c).astype(int)
        frame = MetricFrame(metrics=BASIC, y_true=yt, y_pred=yp, sensitive_features=sf)
        for group, row in frame.by_group.iterrows():
            for metric, value in row.items():
                assert r["by_group"]["sex"][str(c)][group][metric] == value
        per_class[c] = {s: fn(yt, yp, sensitive_features=sf) for s, fn in FAIRLEARN_SUMMARIES.items()}
        for s, value in per_class[c].items():
            assert r["by_feature"]["sex"]["classes"][str(c)][s] == value
    for s in FAIRLEARN_SUMMARIES:
        values = [per_class[c][s] for c in range(4)]
        assert r[s] == (min(values) if s.endswith("ratio") else max(values))
    assert r["num_classes"] == 4


def test_bootstrap_intervals_are_quantiles_of_weighted_metricframes(tmp_path):
    """Each replicate is the data with a Poisson(1) weight per sample: the intervals are the quantiles
    of MetricFrame over the same weights (drawn batch by batch from the callback's seed)."""
    data = synthetic(n=400)
    cb = _validate(tmp_path, data, sensitive_features="sex", n_boot=30, ci_quantiles=[0.05, 0.95], random_state=7)
    r = cb.report()
    y_true, y_pred = binary_arrays(data)
    generator = torch.Generator().manual_seed(7)  # rank 0, epoch 0, validation: the seed itself
    weights = torch.cat(
        [torch.poisson(torch.ones(30, len(b)), generator=generator) for b in torch.arange(400).split(64)], 1
    )
    sf = names(data, "sex")
    per_replicate = {m: [] for m in BASIC}
    dpd = []
    for w in weights.double().numpy():
        frame = MetricFrame(
            metrics=BASIC,
            y_true=y_true,
            y_pred=y_pred,
            sensitive_features=sf,
            sample_params={m: {"sample_weight": w} for m in BASIC},
        )
        for m in BASIC:
            per_replicate[m].append(frame.by_group[m])
        dpd.append(frame.difference()["selection_rate"])
    for group in ("Female", "Male"):
        for metric in BASIC:
            samples = np.array([row[group] for row in per_replicate[metric]])
            assert r["by_group"]["sex"][group][f"{metric}_ci"] == pytest.approx(
                list(np.quantile(samples, [0.05, 0.95])), rel=1e-12
            )
    assert r["by_feature"]["sex"]["demographic_parity_difference_ci"] == pytest.approx(
        list(np.quantile(dpd, [0.05, 0.95])), rel=1e-12
    )
    lo, hi = r["by_feature"]["sex"]["demographic_parity_difference_ci"]
    assert lo < r["demographic_parity_difference"] < hi


def test_missing_column_lists_available_keys(tmp_path):
    with pytest.raises(BatchKeyError, match=r"'gender'.*'x', 'y', 'sex', 'race'"):
        _validate(tmp_path, synthetic(n=64), sensitive_features="gender")


def test_group_without_positives_gives_fairlearns_value_and_is_flagged(tmp_path):
    data = synthetic(n=300, rare_positive_race=2)
    with pytest.warns(UserWarning, match="flagged"):
        cb = _validate(
            tmp_path,
            data,
            sensitive_features="race",
            metrics=["accuracy", "true_positive_rate", "recall"],
            min_group_size=0,
        )
    r = cb.report()
    y_true, y_pred = binary_arrays(data)
    sf = names(data, "race")
    frame = MetricFrame(
        metrics={m: METRICS[m] for m in ("true_positive_rate", "recall")},
        y_true=y_true,
        y_pred=y_pred,
        sensitive_features=sf,
    )
    cell = r["by_group"]["race"]["C"]
    assert cell["true_positive_rate"] == frame.by_group.loc["C", "true_positive_rate"] == 0.0
    assert cell["recall"] == frame.by_group.loc["C", "recall"] == 0.0
    reasons = {(f["group"], f["metric"]) for f in r["flags"]}
    assert ("C", "true_positive_rate") in reasons and ("C", "recall") in reasons
    # the summaries are fairlearn's, the empty group included: never a smaller disparity
    for summary in ("equal_opportunity_difference", "equalized_odds_difference"):
        assert r[summary] == FAIRLEARN_SUMMARIES[summary](y_true, y_pred, sensitive_features=sf)


def test_min_group_size_flags_not_drops(tmp_path):
    data = synthetic(n=200)
    cb = _validate(tmp_path, data, sensitive_features="race", min_group_size=70)
    r = cb.report()
    counts = {g: c["count"] for g, c in r["by_group"]["race"].items()}
    assert sum(counts.values()) == 200 and len(counts) == 3
    for group, cell in r["by_group"]["race"].items():
        assert cell["small"] == (counts[group] < 70)
    assert any(f["metric"] == "count" for f in r["flags"]) == any(c < 70 for c in counts.values())


def test_logging_files_and_report(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    data = synthetic(n=256)
    cb = FairnessMetrics(sensitive_features=["sex", ["sex", "race"]], stages=["validation", "test"], min_group_size=0)
    t = trainer(tmp_path, callbacks=[cb], logger=CSVLogger(str(tmp_path)), max_epochs=1, limit_train_batches=1)
    dm = SyntheticDataModule(data)
    module = LogitModule()
    t.fit(module, dm)
    metrics = t.callback_metrics
    r = cb.report()
    assert float(metrics["fairness/demographic_parity_difference"]) == pytest.approx(r["demographic_parity_difference"])
    assert "fairness/equalized_odds_difference/sex*race" in metrics
    logged = pd.read_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")
    assert (
        logged["fairness/selection_rate/sex=Female"].dropna().item() == r["by_group"]["sex"]["Female"]["selection_rate"]
    )
    assert "fairness/selection_rate/sex=Male,race=C" in logged.columns
    assert logged["fairness/demographic_parity_difference"].dropna().item() == pytest.approx(
        r["demographic_parity_difference"]
    )
    files = sorted(
        p.name for p in (tmp_path / "lightning_logs" / "version_0" / "lightning_trust" / "fairness").iterdir()
    )
    assert "by_group_validation.csv" in files and "by_group_selection_rate_validation.png" in files
    table = pd.read_csv(r["files"]["table_validation"])
    assert set(table["feature"]) == {"sex", "sex*race"}
    assert table[(table.feature == "sex") & (table.group == "Female")]["selection_rate"].item() == pytest.approx(
        r["by_group"]["sex"]["Female"]["selection_rate"]
    )
    assert set(r["figures"]) >= {"by_group_accuracy", "by_group_selection_rate"}
    t.test(module, dm, verbose=False)
    assert "fairness_test/demographic_parity_difference" in t.callback_metrics
    r = cb.report()
    assert r["stage"] == "test" and "validation" in r


def _fit(tmp_path, action, limit, epochs=3):
    cb = FairnessMetrics(sensitive_features="sex", thresholds={"demographic_parity_difference": limit}, action=action)
    t = trainer(tmp_path, callbacks=[cb], max_epochs=epochs, limit_train_batches=1)
    return cb, t


def test_threshold_warn(tmp_path):
    cb, t = _fit(tmp_path, "warn", 0.01)
    with pytest.warns(UserWarning, match="Fairness limit breached.*demographic_parity_difference"):
        t.fit(LogitModule(), SyntheticDataModule(synthetic()))
    assert t.current_epoch == 3
    breaches = cb.report()["breaches"]
    assert (
        len(breaches) == 3 and breaches[0]["summary"] == "demographic_parity_difference" and breaches[0]["value"] > 0.01
    )


def test_threshold_stop(tmp_path):
    cb, t = _fit(tmp_path, "stop", 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(LogitModule(), SyntheticDataModule(synthetic()))
    assert t.current_epoch == 1 and len(cb.report()["breaches"]) == 1


def test_threshold_fail_and_pass(tmp_path):
    cb, t = _fit(tmp_path, "fail", 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FairnessBreachError, match="demographic_parity_difference"):
            t.fit(LogitModule(), SyntheticDataModule(synthetic()))
    assert cb.report()["breaches"]
    cb, t = _fit(tmp_path, "fail", 0.99)
    t.fit(LogitModule(), SyntheticDataModule(synthetic()))
    assert cb.report()["breaches"] == []


def test_resume_ends_with_same_numbers(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = synthetic()

    def run(root, epochs, ckpt=None):
        cb = FairnessMetrics(sensitive_features=["sex", "race"])
        mc = ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        t = trainer(root, callbacks=[cb, mc], max_epochs=epochs, enable_checkpointing=True)
        torch.manual_seed(0)
        t.fit(LogitModule(), SyntheticDataModule(data), ckpt_path=ckpt)
        return cb

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "resumed", 3, ckpt=str(tmp_path / "part" / "epoch=1.ckpt"))
    assert resumed.report()["history"] == full.report()["history"]
    assert resumed.report()["demographic_parity_difference"] == full.report()["demographic_parity_difference"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown fairness metric"):
        FairnessMetrics(metrics=["accuracy", "auc"])
    with pytest.raises(ValueError, match="Unknown summary"):
        FairnessMetrics(thresholds={"dp": 0.1})
    with pytest.raises(ValueError, match="stages"):
        FairnessMetrics(stages=["train"])
    with pytest.raises(ValueError, match="n_boot"):
        FairnessMetrics(n_boot=0)
    with pytest.raises(ValueError, match="listed twice"):
        FairnessMetrics(sensitive_features=["sex", "sex"])
    assert FairnessMetrics(sensitive_features=["sex", "race*sex"]).entries == [["sex"], ["race", "sex"]]


def test_reuses_the_steps_forward(tmp_path):
    """The demo-style step returns no predictions: the callback reuses its forward instead of running another."""

    class Counting(LogitModule):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

        def validation_step(self, batch, batch_idx):
            self(batch["x"])  # computes, logs nothing, returns None

    data = synthetic(n=200)
    cb = FairnessMetrics("sex", min_group_size=0)
    trainer(tmp_path, callbacks=[cb]).validate(Counting(), SyntheticDataModule(data, batch_size=50), verbose=False)
    assert Counting.calls == 4
    y_true, y_pred = binary_arrays(data)
    assert cb.report()["demographic_parity_difference"] == demographic_parity_difference(
        y_true, y_pred, sensitive_features=names(data, "sex")
    )


def test_ci_stages_limits_the_bootstrap(tmp_path):
    data = synthetic(n=200)
    cb = FairnessMetrics("sex", stages=["validation", "test"], n_boot=5, ci_stages=["test"], min_group_size=0)
    t, module, dm = trainer(tmp_path, callbacks=[cb]), LogitModule(), SyntheticDataModule(data)
    t.validate(module, dm, verbose=False)
    assert "selection_rate_ci" not in cb.report()["by_group"]["sex"]["Female"]
    t.test(module, dm, verbose=False)
    lo, hi = cb.report()["by_group"]["sex"]["Female"]["selection_rate_ci"]
    assert lo <= cb.report()["by_group"]["sex"]["Female"]["selection_rate"] <= hi
    with pytest.raises(ValueError, match="ci_stages"):
        FairnessMetrics(stages="validation", ci_stages=["test"])


@pytest.mark.parametrize("when", ["report", "stage_end", "never"])
def test_bar_charts_drawn_when_asked(tmp_path, when):
    cb = FairnessMetrics("sex", figures=when, metrics=["selection_rate"], min_group_size=0)
    t = trainer(tmp_path, callbacks=[cb], max_epochs=1, limit_train_batches=1)
    t.fit(LogitModule(), SyntheticDataModule(synthetic(n=128)))
    folder = next(tmp_path.rglob("lightning_trust/fairness"))
    chart = folder / "by_group_selection_rate_validation.png"
    assert (folder / "by_group_validation.csv").exists() and (folder / "fairness_validation.json").exists()
    assert chart.exists() == (when == "stage_end")
    figures = cb.report()["figures"]
    assert chart.exists() == (when != "never")
    assert (figures == {"by_group_selection_rate": str(chart)}) == (when != "never")
    with pytest.raises(ValueError, match="figures"):
        FairnessMetrics(figures="always")
