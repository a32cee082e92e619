"""Conformal prediction sets: our numbers against MAPIE called directly and a hand LAC quantile,
Mondrian per group, count states, refusals, checkpoints, and the tiny BERT's dict batches."""

import math

import numpy as np
import pytest
import torch
from mapie.classification import SplitConformalClassifier

from lightning_trust.core.seam import mapie_quantile
from lightning_trust.demo import TabularMLP
from lightning_trust.evaluation.calibration import fit_temperature
from lightning_trust.evaluation.conformal import (
    ConformalPredictor,
    GivenProbabilities,
    SetCounts,
    min_calibration_samples,
)
from lightning_trust.evaluation.sample_keys import calibrates, sample_keys
from lightning_trust.evaluation.uncertainty import UncertaintyEvaluation
from lightning_trust.evaluation.uncertainty_fit import conformal_probabilities, fit_calibration, fit_predictors
from lightning_trust.evaluation.uncertainty_results import CellLayout, conformal_results
from tests.support import AdultSubset, trainer


def _data(n=600, c=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=p) for p in probs])
    return probs, labels


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_sets_equal_mapie_called_directly(score):
    probs, labels = _data()
    ours = ConformalPredictor(score, 0.9, 4, seed=3).fit(probs[:300], labels[:300]).predict_sets(probs[300:])
    mapie = SplitConformalClassifier(
        GivenProbabilities(4).fit(), confidence_level=0.9, conformity_score=score, prefit=True, random_state=3
    ).conformalize(probs[:300], labels[:300])
    np.testing.assert_array_equal(ours, mapie.predict_set(probs[300:])[1][:, :, 0])
    assert ours.sum(1).min() >= 1


def test_lac_quantile_and_sets_by_hand():
    probs, labels = _data(n=400, c=3, seed=1)
    cal, test = slice(0, 200), slice(200, 400)
    predictor = ConformalPredictor("lac", 0.8, 3).fit(probs[cal], labels[cal])
    scores = np.sort(1 - probs[cal][np.arange(200), labels[cal]])
    q = scores[math.ceil(201 * 0.8) - 1]  # the ceil((n+1)(1-alpha))-th smallest score
    assert predictor.quantiles()[0] == pytest.approx(q)
    np.testing.assert_array_equal(predictor.predict_sets(probs[test]), probs[test] >= 1 - q - 1e-12)


def test_mondrian_calibrates_each_group_and_gives_small_groups_the_full_set():
    probs, labels = _data(n=900, c=3, seed=2)
    groups = np.r_[np.zeros(600, int), np.ones(295, int), np.full(5, 2)]
    probs[groups == 1] = probs[groups == 1] ** 0.2 / (probs[groups == 1] ** 0.2).sum(1, keepdims=True)  # flatter
    predictor = ConformalPredictor("lac", 0.9, 3).fit(probs, labels, groups)
    assert predictor.full_set_groups == [2] and min_calibration_samples(0.9) == 9
    for g in (0, 1):
        alone = ConformalPredictor("lac", 0.9, 3).fit(probs[groups == g], labels[groups == g])
        assert predictor.quantiles()[g] == pytest.approx(alone.quantiles()[0])
    assert predictor.quantiles()[0] != pytest.approx(predictor.quantiles()[1])
    assert predictor.predict_sets(probs[:3], np.array([2, 2, 2])).all()


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_calibrated_sets_equal_mapie_on_the_temperature_scaled_probabilities(score):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(700, 4, generator=g) * 4  # overconfident: the temperature is well above 1
    target = torch.multinomial((logits / 4).softmax(1), 1, generator=g).reshape(-1)
    rows = {"logits": logits[:400], "target": target[:400], "key": torch.arange(400), "codes": torch.zeros(400, 0)}
    calibration = fit_calibration(rows, confidence_level=0.9, temperature_scaling=True, epoch=0, seen=400)
    t = calibration["temperature"]
    assert t == pytest.approx(fit_temperature(logits[:400], target[:400])) and t > 2
    layout = CellLayout([], [])
    member = layout.membership(torch.zeros(300, 0, dtype=torch.long))
    got = {}
    for on in ("calibrated", "raw"):
        predictors = fit_predictors(calibration, [score], confidence_level=0.9, seed=1, include_last_label=True,
                                    conformal_on=on, mondrian_column=None)  # fmt: skip
        probs = conformal_probabilities(logits[400:], t, on)
        got[on] = conformal_results(predictors, probs, target[400:], member, None, layout, 0.9, 1)[score]
    scaled = lambda z: (z.float() / t).softmax(1).double().numpy()  # noqa: E731
    mapie = SplitConformalClassifier(
        GivenProbabilities(4).fit(), confidence_level=0.9, conformity_score=score, prefit=True, random_state=1
    ).conformalize(scaled(logits[:400]), target[:400].numpy())
    sets = mapie.predict_set(scaled(logits[400:]))[1][:, :, 0]
    assert got["calibrated"]["coverage"] == pytest.approx(sets[np.arange(300), target[400:].numpy()].mean())
    assert got["calibrated"]["mean_set_size"] == pytest.approx(sets.sum(1).mean())
    assert got["calibrated"]["quantiles"]["0"] == pytest.approx(mapie_quantile(mapie))
    if score != "lac":  # LAC's sets move little with T; APS/RAPS accumulate the (flatter) scaled mass
        assert got["calibrated"]["mean_set_size"] != pytest.approx(got["raw"]["mean_set_size"])


def test_set_counts_are_sums_per_cell():
    sets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]]).bool()
    target = torch.tensor([0, 0, 2, 1])
    member = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]]).bool()
    m = SetCounts(2)
    m.update(sets[:2], target[:2], member[:2])
    m.update(sets[2:], target[2:], member[2:])
    covered, size, count = (v.tolist() for v in m.compute())
    assert covered == [2, 2] and size == [2 + 1 + 3 + 1, 2 + 3] and count == [4, 2]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"confidence_level": 1.5}, "confidence_level"),
    ({"scores": ["thr"]}, "scores"),
    ({"calibration_fraction": 1.0}, "calibration_fraction"),
    ({"mondrian": "race", "sensitive_features": ["sex"]}, "mondrian='race'"),
    ({"shift_tests": ["energy"]}, "shift_tests"),
    ({"n_permutations": 5}, "n_permutations"),
    ({"include_last_label": "sometimes"}, "include_last_label"),
    ({"conformal_on": "scaled"}, "conformal_on"),
    ({"conformal_on": "calibrated", "temperature_scaling": False}, "temperature_scaling=True"),
])  # fmt: skip
def test_bad_configuration_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UncertaintyEvaluation(**kwargs)


def _validation_logits(model, loader):
    model.eval()
    with torch.no_grad():
        return [(model(b["x"]), b["y"], b["sex"], b["native_region"], b["x"]) for b in loader]


@pytest.mark.slow
def test_adult_callback_equals_mapie_on_the_same_split_and_resumes_from_its_state(adult, tmp_path):
    dm = AdultSubset(adult, n_train=1024, n_val=1200, n_test=800, eval_batch_size=300)
    cb = UncertaintyEvaluation(sensitive_features=["sex"], domain_key="native_region", scores=["lac"],
                               mondrian="sex", shift_tests=[], seed=5)  # fmt: skip
    torch.manual_seed(0)
    model = TabularMLP()
    tr = trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=4)
    tr.fit(model, dm)
    report = cb.report()
    # the same split by hand: each sample's seeded content coin, then MAPIE per sex group
    cal, ev = [], []
    for logits, y, sex, region, x in _validation_logits(model, dm.val_dataloader()):
        coin = calibrates(sample_keys(x, y, seed=5), 0.5)
        cal.append((logits[coin], y[coin], sex[coin]))
        ev.append((logits[~coin], y[~coin], sex[~coin], region[~coin]))
    cl, cy, cs = (torch.cat(t) for t in zip(*cal))
    el, ey, es, er = (torch.cat(t) for t in zip(*ev))
    assert report["conformal"]["calibration_samples"] == len(cy) and report["evaluation_samples"] == len(ey)
    cp, ep = cl.softmax(1).double().numpy(), el.softmax(1).double().numpy()
    for score in ("lac",):
        sets = np.zeros((len(ey), 2), bool)
        for g in (0, 1):
            m = SplitConformalClassifier(
                GivenProbabilities(2).fit(), confidence_level=0.9, conformity_score=score, prefit=True, random_state=5
            ).conformalize(cp[cs == g], cy.numpy()[cs == g])
            sets[es.numpy() == g] = m.predict_set(ep[es.numpy() == g])[1][:, :, 0]
        covered = sets[np.arange(len(ey)), ey.numpy()]
        cells = report["conformal"]["scores"][score]["cells"]
        assert cells["overall"]["coverage"] == pytest.approx(covered.mean())
        assert cells["overall"]["mean_set_size"] == pytest.approx(sets.sum(1).mean())
        us = er.numpy() == 0
        assert cells["native_region=United-States"]["coverage"] == pytest.approx(covered[us].mean())
        assert cells["native_region=United-States"]["samples"] == int(us.sum())
        female = es.numpy() == adult.categories["sex"].index("Female")
        assert cells["sex=Female"]["coverage_gap"] == pytest.approx(0.9 - covered[female].mean())
    gaps = [v["coverage_gap"] for s in report["conformal"]["scores"].values() for n, v in s["cells"].items()
            if v["samples"] >= 50]  # fmt: skip
    assert report["conformal"]["coverage_gap"] == pytest.approx(max(gaps))
    # a fresh callback from the state tests with the same calibration
    restored = UncertaintyEvaluation(sensitive_features=["sex"], domain_key="native_region", scores=["lac"],
                                     mondrian="sex", shift_tests=[], seed=5)  # fmt: skip
    restored.load_state_dict(cb.state_dict())
    tr.test(model, dm)
    trainer(tmp_path, [restored]).test(model, dm)
    assert restored.report()["conformal"] == cb.report()["conformal"]
    assert restored.report()["calibration"]["after"] == cb.report()["calibration"]["after"]


def test_test_without_calibration_is_refused(adult, tmp_path):
    dm = AdultSubset(adult, n_train=64, n_val=64, n_test=64)
    with pytest.raises(RuntimeError, match="calibrates on a validation pass"):
        trainer(tmp_path, [UncertaintyEvaluation(shift_tests=[])]).test(TabularMLP(), dm)


@pytest.mark.slow
def test_tiny_bert_dict_batches_groups_domains_and_shift(tmp_path):
    from tests.foundation.models import build

    module, dm = build("bert")
    cb = UncertaintyEvaluation(sensitive_features=["group"], domain_key="domain", shift_tests=["mmd", "ks"],
                               shift_samples=40, n_permutations=99, min_cell_samples=5)  # fmt: skip
    trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2).fit(module, dm)
    report = cb.report()
    assert report["evaluated"] and report["evaluation_samples"] + report["conformal"]["calibration_samples"] == 64
    lac = report["conformal"]["scores"]["lac"]["cells"]
    assert {"overall", "group=0", "group=1", "domain=0", "domain=1", "domain=2"} <= set(lac)
    assert sum(lac[f"domain={d}"]["samples"] for d in range(3)) == lac["overall"]["samples"]
    assert report["calibration"]["temperature"] > 0
    shift = report["shift"]["domains"]
    assert set(shift) == {"0", "1", "2"}
    for d in shift.values():
        assert 0 < d["mmd"]["p_value"] <= 1 and d["mmd"]["n_reference"] == 40 and d["ks"]["dimensions"] == 32
    assert all(__import__("pathlib").Path(p).exists() for p in report["figures"].values())


@pytest.mark.slow
def test_digits_tuple_batches_aps_raps_equal_mapie(digits, tmp_path):
    from lightning_trust.demo import SmallCNN

    cb = UncertaintyEvaluation(
        shift_tests=["mmd"], shift_samples=60, n_permutations=99, include_last_label="randomized"
    )
    torch.manual_seed(0)
    model = SmallCNN()
    tr = trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=6)
    tr.fit(model, digits)
    report = cb.report()
    assert sorted(report["conformal"]["scores"]) == ["aps", "lac", "raps"]
    model.eval()
    with torch.no_grad():
        batches = [(model(x), y) for x, y in digits.val_dataloader()]
    keys = [sample_keys(x, y, seed=0) for x, y in digits.val_dataloader()]
    coins = [calibrates(k, 0.5) for k in keys]
    order = torch.cat([k[c] for k, c in zip(keys, coins)]).argsort(stable=True)  # calibration rows by key
    cl = torch.cat([b[0][c] for b, c in zip(batches, coins)])[order].softmax(1).double().numpy()
    cy = torch.cat([b[1][c] for b, c in zip(batches, coins)])[order].numpy()
    rest = torch.cat([k[~c] for k, c in zip(keys, coins)]).argsort(stable=True)  # evaluated rows by key
    el = torch.cat([b[0][~c] for b, c in zip(batches, coins)])[rest].softmax(1).double().numpy()
    ey = torch.cat([b[1][~c] for b, c in zip(batches, coins)])[rest].numpy()
    for score in ("lac", "aps", "raps"):
        m = SplitConformalClassifier(
            GivenProbabilities(10).fit(), confidence_level=0.9, conformity_score=score, prefit=True, random_state=0
        ).conformalize(cl, cy)
        m.predict_set(np.full((1, 10), 0.1))
        params = {} if score == "lac" else {"include_last_label": "randomized"}
        sets = m.predict_set(el, conformity_score_params=params)[1][:, :, 0]
        got = report["conformal"]["scores"][score]
        assert got["coverage"] == pytest.approx(sets[np.arange(len(ey)), ey].mean())
        assert got["mean_set_size"] == pytest.approx(sets.sum(1).mean())
    assert 0 < report["shift"]["domains"]["validate"]["mmd"]["p_value"] <= 1


def test_aps_on_two_classes_is_refused_at_setup(adult, tmp_path):
    dm = AdultSubset(adult, n_train=64, n_val=64)
    dm.num_classes = 2
    with pytest.raises(ValueError, match="scores=\\['lac'\\]"):
        trainer(tmp_path, [UncertaintyEvaluation(scores=["aps"], shift_tests=[])], max_epochs=1).fit(TabularMLP(), dm)
