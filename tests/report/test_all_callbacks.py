"""A run with the pack's real callbacks: all three files, a valid JSON, every standard with the right verdict."""

import json

import jsonschema
import pytest
import torch

from lightning_trust.compression import ProgressivePruning, QuantizationAwareTraining
from lightning_trust.demo import SmallCNN, TabularMLP
from lightning_trust.evaluation import CrossDomainEvaluation
from lightning_trust.explain import AdversarialRobustness, Attribution
from lightning_trust.fairness import FairnessMetrics
from lightning_trust.federated import FederatedSimulation
from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.report import TrustReport, card_schema, load_card, render_markdown
from lightning_trust.report.standards import flatten_numbers
from tests.support import trainer

pytestmark = pytest.mark.slow


def _check(report, callbacks, standards, expected):
    card = load_card(report.paths["json"])
    assert all(p.is_file() for p in report.paths.values())
    jsonschema.validate(card, card_schema(), cls=jsonschema.Draft202012Validator)
    assert render_markdown(card).encode() == report.paths["md"].read_bytes()
    # every reporting callback is a section, with every figure it made embedded
    for cb in callbacks:
        own = cb.report()
        assert cb.report_section in card["sections"], cb.report_section
        for name in own.get("figures") or {}:
            figure = next(f for f in card["figures"] if f["key"] == f"{cb.report_section}.{name}")
            assert figure["data"], figure["key"]
    # each declared standard, in order, with the value the callback reports and the right verdict
    assert [s["name"] for s in card["standards"]] == list(standards)
    sections = {cb.report_section: cb.report() for cb in callbacks}
    numbers = flatten_numbers({k: {kk: vv for kk, vv in v.items() if kk != "figures"} for k, v in sections.items()})
    for entry in card["standards"]:
        assert entry["status"] == expected[entry["name"]], entry
        if entry["name"] in numbers:
            assert entry["value"] == pytest.approx(numbers[entry["name"]]), entry
    return card


def test_tabular_run_with_privacy_fairness_explanations_robustness_domains_pruning(adult, tmp_path):
    torch.manual_seed(0)
    callbacks = [
        DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5),
        FairnessMetrics(sensitive_features=["sex", "race"], thresholds={"demographic_parity_difference": 0.1}),
        Attribution(num_samples=16, progress=False),
        AdversarialRobustness(attacks=["fgsm"], epsilons=[0.1], num_samples=32, progress=False),
        CrossDomainEvaluation(domain_key="native_region", in_domain=["United-States"], metrics=["accuracy"]),
        ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=1, end_epoch=1, measure_latency=False),
    ]
    standards = {
        "privacy.epsilon": {"max": 1000.0},  # made to pass
        "evaluation.worst.accuracy": {"min": 1.0},  # made to fail: no region is classified perfectly
        "explain.infidelity": {"min": 0.0},
        "robustness.robust_accuracy.fgsm.0.1": {"max": 1.0},
        "fairness.demographic_parity_difference": {"min": 0.0, "max": 1.0},
        "compression.macs_ratio": {"max": 0.5},
    }
    report = TrustReport(standards=standards, fail_on_breach=True, sensitive_features=["sex", "race"],
                         domain_key="native_region", verbose=False)  # fmt: skip
    t = trainer(
        tmp_path, [*callbacks, report], max_epochs=2, limit_train_batches=4, limit_val_batches=4, limit_test_batches=2
    )
    t.fit(TabularMLP(), adult)
    expected = dict.fromkeys(standards, "met") | {"evaluation.worst.accuracy": "not_met"}
    card = _check(report, callbacks, standards, expected)
    assert report.exit_code == 1
    assert {"privacy.epsilon_curve", "explain.feature_importance", "compression.pruning_curve"} <= {
        f["key"] for f in card["figures"]
    }
    assert card["model"]["macs"] == card["sections"]["compression"]["macs_after"]  # one counter, per sample


def test_federated_run_reports_its_rounds(adult, tmp_path):
    fed = FederatedSimulation(num_clients=4, clients_per_round=2, local_steps=2, seed=0)
    standards = {"federated.rounds": {"min": 2}, "federated.num_clients": {"max": 3}}
    report = TrustReport(standards=standards, verbose=False)
    t = trainer(tmp_path, [fed, report], max_epochs=2, limit_val_batches=2, limit_test_batches=2)
    t.fit(TabularMLP(), adult)
    _check(report, [fed], standards, {"federated.rounds": "met", "federated.num_clients": "not_met"})
    assert report.exit_code == 0  # fail_on_breach is off: the breach is reported, the run passes


def test_image_run_with_heatmaps_corruptions_pruning_and_int8(digits, tmp_path):
    torch.manual_seed(0)
    callbacks = [
        Attribution(num_samples=8, num_heatmaps=4, progress=False),
        CrossDomainEvaluation(corruptions=["gaussian_noise", "blur"], severities=[1, 3], metrics=["accuracy"]),
        ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=1, measure_latency=False),
        QuantizationAwareTraining(start_epoch=2, compile=False, measure_latency=False),
    ]
    standards = {"compression.macs_ratio": {"max": 0.6}, "quantization.agreement": {"min": 1.01}}
    report = TrustReport(standards=standards, verbose=False)
    t = trainer(
        tmp_path, [*callbacks, report], max_epochs=3, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2
    )
    model = SmallCNN()
    t.fit(model, digits)
    card = _check(report, callbacks, standards, {"compression.macs_ratio": "met", "quantization.agreement": "not_met"})
    assert {"explain.heatmaps", "compression.pruning_curve", "quantization.int8_vs_fp32"} <= {
        f["key"] for f in card["figures"]
    }
    # the card's model is the pruned one, and its MACs are counted through the QAT graph
    assert (
        card["model"]["params"]
        == sum(p.numel() for p in model.parameters())
        == card["sections"]["compression"]["params_after"]
    )
    assert card["model"]["macs"] and card["model"]["macs"] < card["sections"]["compression"]["macs_before"]
    assert json.loads(report.paths["json"].read_text())["stage"] == "fit"


def test_fairness_mitigation_callbacks_report_under_their_stable_names(adult, tmp_path):
    from lightning_trust.fairness import FairnessPenalty, ThresholdOptimizer

    torch.manual_seed(0)
    metrics = FairnessMetrics(sensitive_features=["sex"])
    penalty = FairnessPenalty(sensitive_feature="sex", lam=1.0)
    thresholds = ThresholdOptimizer(sensitive_feature="sex", name="fair_thresholds")
    standards = {
        "fairness_mitigation.lam": {"min": 1.0},  # the penalty's section: its report_section
        "fair_thresholds.after.demographic_parity_difference": {"max": 1.0},  # the threshold optimizer's: its name
        "fair_thresholds.after.accuracy": {"min": 1.01},  # made to fail
    }
    report = TrustReport(standards=standards, verbose=False)
    # the thresholds come first in the Trainer: the section names do not depend on callback order
    t = trainer(tmp_path, [thresholds, metrics, penalty, report], max_epochs=1, limit_train_batches=5,
                limit_val_batches=4, limit_test_batches=2)  # fmt: skip
    t.fit(TabularMLP(), adult)
    card = load_card(report.paths["json"])
    assert list(card["sections"]) == ["fair_thresholds", "fairness", "fairness_mitigation"]
    after = thresholds.report()["after"]
    # NaN (an undefined ratio) is written as null: the card is strict JSON
    assert card["sections"]["fair_thresholds"]["after"] == {
        k: None if isinstance(v, float) and v != v else pytest.approx(v) for k, v in after.items()
    }
    verdicts = {s["name"]: s["status"] for s in card["standards"]}
    assert verdicts == dict(zip(standards, ["met", "met", "not_met"]))


def test_two_callbacks_with_one_section_name_are_refused_before_training(adult, tmp_path):
    from lightning_trust.core import DuplicateSectionError
    from lightning_trust.fairness import FairnessPenalty, ThresholdOptimizer

    callbacks = [FairnessPenalty(sensitive_feature="sex"), ThresholdOptimizer(sensitive_feature="sex"), TrustReport()]
    with pytest.raises(DuplicateSectionError, match="would both write the report section 'fairness_mitigation'"):
        trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=2).fit(TabularMLP(), adult)
