import json
from pathlib import Path

import pytest

from lightning_trust.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_adult_dp_config_trains_privately(tmp_path):
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "adult_dp.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert code == 0
    report = json.loads(next(tmp_path.rglob("lightning_trust/privacy/privacy.json")).read_text())
    # one epoch of Poisson batches of expected size 512 over 27,146 rows: q = 1/54, 54 steps, ε at the target
    assert report["steps"] == 54 and report["sample_rate"] == pytest.approx(1 / 54)
    assert 3.0 - 0.01 <= report["epsilon"] <= 3.0 and report["delta"] == 1e-5
    assert report["accountant"] == "prv" and report["sampling"] == "poisson"
    metrics = (next(tmp_path.rglob("metrics.csv"))).read_text()
    assert "privacy/epsilon" in metrics and "privacy/noise_multiplier" in metrics
