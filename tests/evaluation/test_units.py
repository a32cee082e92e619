"""Metrics by name, corruptions, corruption error and summaries: values against the libraries and hand math."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_trust.evaluation import CORRUPTIONS, BrierScore, NegativeLogLikelihood, corrupt, corruption_errors
from lightning_trust.evaluation.corruptions import resolve_corruptions
from lightning_trust.evaluation.metrics import MetricSpec, to_probabilities
from lightning_trust.evaluation.summary import summarize


def test_nll_and_brier_equal_sklearn_and_numpy():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(200, 4, generator=g).softmax(1)
    target = torch.randint(0, 4, (200,), generator=g)
    nll = NegativeLogLikelihood()
    for chunk in range(0, 200, 64):  # several updates accumulate like one
        nll.update(probs[chunk : chunk + 64], target[chunk : chunk + 64])
    assert float(nll.compute()) == pytest.approx(log_loss(target.numpy(), probs.numpy(), labels=[0, 1, 2, 3]), rel=1e-6)
    brier = BrierScore()
    brier.update(probs, target)
    onehot = np.eye(4)[target.numpy()]
    assert float(brier.compute()) == pytest.approx(((probs.numpy() - onehot) ** 2).sum(1).mean(), rel=1e-6)


def test_named_metrics_build_the_torchmetrics_classes():
    assert type(MetricSpec.from_name("accuracy").build(2)).__name__ == "MulticlassAccuracy"
    assert type(MetricSpec.from_name("f1").build(2)).__name__ == "BinaryF1Score"
    assert type(MetricSpec.from_name("f1").build(5)).__name__ == "MulticlassF1Score"
    assert type(MetricSpec.from_name("auroc").build(2)).__name__ == "BinaryAUROC"
    ece = MetricSpec.from_name("ece", {"n_bins": 7}).build(3)
    assert type(ece).__name__ == "MulticlassCalibrationError" and ece.n_bins == 7
    precision = MetricSpec.from_name("torchmetrics.classification.MulticlassPrecision", {"average": "macro"})
    assert precision.name == "MulticlassPrecision" and precision.build(3).num_classes == 3


def test_ece_metric_equals_torchmetrics_functional():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(300, 3, generator=g).softmax(1)
    target = torch.randint(0, 3, (300,), generator=g)
    metric = MetricSpec.from_name("ece").build(3)
    metric.update(probs, target)
    assert float(metric.compute()) == pytest.approx(float(multiclass_calibration_error(probs, target, 3, n_bins=15)))


@pytest.mark.parametrize("bad", ["acuracy", "torchmetrics.NoSuchMetric", "torch.nn.Linear"])
def test_unknown_metric_names_fail_clearly(bad):
    with pytest.raises(ValueError, match="metric|Metric"):
        MetricSpec.from_name(bad)


def test_predictions_to_probabilities():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(to_probabilities(logits), logits.softmax(1))
    one_column = to_probabilities(torch.tensor([0.0, 2.0]))
    assert torch.allclose(one_column[:, 1], torch.sigmoid(torch.tensor([0.0, 2.0])))
    assert torch.allclose(to_probabilities(torch.tensor([[0.3, 0.7]]), "probs"), torch.tensor([[0.3, 0.7]]))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_identity_at_severity_zero_and_deterministic(name):
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(corrupt(x, name, 0), x)
    a = corrupt(x, name, 3, torch.Generator().manual_seed(5))
    b = corrupt(x, name, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # the distortion grows with severity (averaged over images)
    dist = [float((corrupt(x, name, s, torch.Generator().manual_seed(5)) - x).abs().mean()) for s in (1, 5)]
    assert dist[1] > dist[0] > 0


def test_corruption_value_range_and_bad_arguments():
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # images in [-1, 1]
    y = corrupt(x, "brightness", 5, value_range=(-1.0, 1.0))
    assert torch.allclose(y, (x + 1.0).clamp(-1, 1))  # +0.5 of the unit range is +1.0 here
    with pytest.raises(ValueError, match="Unknown corruption"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "blur", 6)
    with pytest.raises(ValueError, match="image inputs"):
        corrupt(torch.rand(4, 10), "blur", 1)
    assert resolve_corruptions("all") == list(CORRUPTIONS)
    with pytest.raises(ValueError, match="Unknown corruption"):
        resolve_corruptions(["blur", "snow"])


def test_corruption_error_hand_computed():
    errors = {"blur": {1: 0.2, 2: 0.4}, "contrast": {1: 0.1, 2: 0.3}}
    plain = corruption_errors(0.1, errors)
    assert plain["per_corruption"]["blur"]["ce"] == pytest.approx(0.3)
    assert plain["per_corruption"]["blur"]["relative_ce"] == pytest.approx(0.2)
    assert plain["corruption_error"] == pytest.approx((0.3 + 0.2) / 2)
    assert plain["relative_corruption_error"] == pytest.approx((0.2 + 0.1) / 2)
    baseline = {"clean_error": 0.05, "errors": {"blur": {"1": 0.3, "2": 0.5}, "contrast": {"1": 0.2, "2": 0.2}}}
    norm = corruption_errors(0.1, errors, baseline)
    assert norm["normalized"] is True
    assert norm["per_corruption"]["blur"]["ce"] == pytest.approx(0.6 / 0.8)  # sum_s E / sum_s E_base
    assert norm["per_corruption"]["blur"]["relative_ce"] == pytest.approx((0.1 + 0.3) / (0.25 + 0.45))
    assert norm["corruption_error"] == pytest.approx((0.6 / 0.8 + 0.4 / 0.4) / 2)
    # a model against itself has CE = relative CE = 1
    self_norm = corruption_errors(0.1, errors, {"clean_error": 0.1, "errors": plain["errors"]})
    assert self_norm["corruption_error"] == pytest.approx(1.0)
    assert self_norm["relative_corruption_error"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no errors for corruption"):
        corruption_errors(0.1, errors, {"clean_error": 0.1, "errors": {"blur": {"1": 0.1, "2": 0.1}}})


def test_summaries_on_a_hand_made_case():
    per_domain = {
        "us": {"accuracy": 0.9, "nll": 0.3},
        "asia": {"accuracy": 0.7, "nll": 0.6},
        "europe": {"accuracy": 0.8, "nll": 0.5},
        "empty": {"accuracy": None, "nll": None},
    }
    sizes = {"us": 100, "asia": 20, "europe": 30, "empty": 0}
    s = summarize(per_domain, sizes, {"accuracy": True, "nll": False}, in_domain=["us"])
    assert s["average"]["accuracy"] == pytest.approx(0.8)
    assert s["weighted_average"]["accuracy"] == pytest.approx((90 + 14 + 24) / 150)
    assert s["worst"]["accuracy"] == 0.7 and s["worst_domain"]["accuracy"] == "asia"
    assert s["worst"]["nll"] == 0.6 and s["worst_domain"]["nll"] == "asia"  # lower is better for nll
    assert s["best_domain"]["accuracy"] == "us"
    assert s["in_domain"]["accuracy"] == pytest.approx(0.9)
    assert s["ood"]["accuracy"] == pytest.approx(0.75)
    assert s["ood_weighted"]["accuracy"] == pytest.approx((14 + 24) / 50)
    assert s["ood_gap"]["accuracy"] == pytest.approx(0.15)  # positive = worse out of domain
    assert s["ood_gap"]["nll"] == pytest.approx(0.25)  # also positive: OOD nll is higher
    no_split = summarize(per_domain, sizes, {"accuracy": True})
    assert not no_split["ood_gap"] and not math.isnan(no_split["average"]["accuracy"])
