import json

import pytest
import torch

from lightning_trust.demo import TabularMLP
from lightning_trust.report import TrustReport
from tests.report.helpers import LIMITS, FakeSection
from tests.support import trainer

STANDARDS = {
    "privacy.epsilon": {"max": 8},  # 2.5: met
    "robustness.robust_accuracy.fgsm.0.1": {"min": 0.9},  # 0.7: not met
    "model.params": {"max": 100_000},  # met
    "metrics.test/acc": {"min": 0.0},  # not measured after fit, met after test
}


@pytest.fixture(scope="session")
def run(adult, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    torch.manual_seed(0)
    privacy = FakeSection("privacy", {"epsilon": 2.5, "delta": 1e-5, "sampling": "poisson"}, figure="epsilon_curve")
    robustness = FakeSection(
        "robustness", {"robust_accuracy": {"fgsm": {"0.1": 0.7}}, "worst_accuracy": 0.7}, figure="robust_accuracy"
    )
    explain = FakeSection(
        "explain", {"method": "integrated_gradients", "top_features": [{"feature": "age", "score": 0.4}]}, figure=None
    )
    report = TrustReport(
        standards=STANDARDS, fail_on_breach=True, sensitive_features=["sex", "race"], domain_key="native_region"
    )
    model = TabularMLP()
    t = trainer(tmp, [privacy, robustness, explain, report], **LIMITS)
    t.fit(model, adult)
    after_fit = json.loads(report.paths["json"].read_text())
    md_after_fit = report.paths["md"].read_bytes()
    t.test(model, adult)
    return {"report": report, "trainer": t, "model": model, "fit": after_fit, "md_fit": md_after_fit, "dir": tmp}
