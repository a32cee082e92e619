"""The two main jobs (configs/adult.yaml, configs/digits.yaml) are wired as documented."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(sys.executable).with_name("lightning-trust"))


def _callbacks(config: str) -> dict:
    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    return {cb["class_path"].rsplit(".", 1)[-1]: cb.get("init_args", {}) for cb in data["trainer"]["callbacks"]}


def test_adult_job_declares_the_documented_callbacks_and_standards():
    callbacks = _callbacks("adult.yaml")
    assert {
        "DifferentialPrivacy",
        "FairnessMetrics",
        "Attribution",
        "CrossDomainEvaluation",
        "ProgressivePruning",
        "PrivacyAudit",
        "UncertaintyEvaluation",
        "TrustReport",
    } <= set(callbacks)
    assert callbacks["DifferentialPrivacy"]["target_epsilon"] == 3.0
    assert callbacks["UncertaintyEvaluation"]["domain_key"] == "native_region"
    assert {"privacy_audit.epsilon_gap", "uncertainty.conformal.coverage_gap"} <= set(
        callbacks["TrustReport"]["standards"]
    )
    assert callbacks["ProgressivePruning"]["pruning_ratio"] == 0.5
    assert callbacks["FairnessMetrics"]["sensitive_features"] == ["sex", "race"]
    assert callbacks["CrossDomainEvaluation"]["domain_key"] == "native_region"
    assert callbacks["TrustReport"]["standards"]["privacy.epsilon"] == {"max": 3.0}


def test_digits_job_declares_the_documented_callbacks_and_standards():
    callbacks = _callbacks("digits.yaml")
    assert {
        "Attribution",
        "CrossDomainEvaluation",
        "ProgressivePruning",
        "QuantizationAwareTraining",
        "TrustReport",
    } <= set(callbacks)
    assert callbacks["CrossDomainEvaluation"]["corruptions"]
    assert "quantization.agreement" in callbacks["TrustReport"]["standards"]


@pytest.mark.slow
def test_adult_job_shortened_ends_with_the_card_path_and_the_verdicts(tmp_path):
    # five short epochs: the pruning schedule (epochs 2-4) runs to its end inside the private run
    args = [SCRIPT, "fit", "--config", str(ROOT / "configs/adult.yaml"), "--trainer.max_epochs=5",
            "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=3", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    card = json.loads(next(tmp_path.glob("**/model_card.json")).read_text())
    standards = _callbacks("adult.yaml")["TrustReport"]["standards"]
    assert [s["name"] for s in card["standards"]] == list(standards)
    assert all(s["status"] in ("met", "not_met") for s in card["standards"])
    assert {"privacy", "fairness", "explain", "evaluation", "compression", "privacy_audit", "uncertainty"} <= set(
        card["sections"]
    )
    audit = card["sections"]["privacy_audit"]
    assert audit["canaries"] == 1000 and audit["accountant_epsilon"] == card["sections"]["privacy"]["epsilon"]
    assert 0 <= audit["epsilon_lower_bound"] <= audit["accountant_epsilon"]
    assert card["sections"]["compression"]["steps_done"] == 3 and card["sections"]["compression"]["macs_ratio"] < 0.5
    assert "re-attached Opacus's hooks" in proc.stdout + proc.stderr
    tail = proc.stdout.strip().splitlines()[-(len(standards) + 2) :]
    assert tail[0].startswith("Model card: ") and tail[0].endswith("model_card.html (and .md, .json)")
    assert tail[1].startswith("Standards: ")
    assert [line.split("]")[1].split()[0] for line in tail[2:]] == list(standards)
