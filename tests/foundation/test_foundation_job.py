"""The foundation main job (configs/foundation.yaml) runs from the command line and writes a card."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(sys.executable).with_name("lightning-trust"))


def _config() -> dict:
    return yaml.safe_load((ROOT / "configs" / "foundation.yaml").read_text())


def test_foundation_job_declares_lora_dp_fairness_domains_and_standards():
    config = _config()
    callbacks = {cb["class_path"]: cb.get("init_args", {}) for cb in config["trainer"]["callbacks"]}
    assert {"DifferentialPrivacy", "FairnessMetrics", "CrossDomainEvaluation", "TrustReport"} <= set(callbacks)
    assert {"PrivacyAudit", "UncertaintyEvaluation"} <= set(callbacks)
    assert config["model"]["class_path"] == "TinyTextTransformer" and config["model"]["init_args"]["lora_rank"] > 0
    assert config["data"]["class_path"] == "AdultTextDataModule"
    assert callbacks["FairnessMetrics"]["sensitive_features"] == ["sex", "race"]
    assert callbacks["TrustReport"]["standards"]["privacy.epsilon"] == {"max": 8.0}


@pytest.mark.slow
def test_foundation_job_shortened_pretrains_on_first_use_and_writes_the_card(tmp_path):
    encoder = tmp_path / "pretrain" / "last.ckpt"  # missing: the job pretrains and caches it first
    args = [SCRIPT, "fit", "--config", str(ROOT / "configs/foundation.yaml"), "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=3", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.pretrained={encoder}", "--model.pretrain_epochs=1", "--model.pretrain_limit_batches=4"]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert encoder.exists() and "pretrained one (masked LM, 1 epoch, 4 steps" in out
    card = json.loads(next(tmp_path.glob("**/model_card.json")).read_text())
    standards = _config()["trainer"]["callbacks"][-1]["init_args"]["standards"]
    assert [s["name"] for s in card["standards"]] == list(standards)
    assert {"privacy", "fairness", "evaluation", "privacy_audit", "uncertainty"} <= set(card["sections"])
    assert 0 <= card["sections"]["privacy_audit"]["epsilon_lower_bound"] <= card["sections"]["privacy"]["epsilon"]
    assert card["model"]["trainable_params"] < card["model"]["params"] / 10  # LoRA: adapters and head only
    assert 0 < card["sections"]["privacy"]["epsilon"] <= 8.0
    assert "Standards:" in out and "model_card.html" in out
