import json
import warnings
from pathlib import Path

import pytest

from lightning_trust.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_adult_fair_config_runs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "adult_fair.yaml"),
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=20",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
    assert code == 0
    folder = next(tmp_path.rglob("lightning_trust/fairness"))
    report = json.loads((folder / "fairness_validation.json").read_text())
    assert set(report["by_feature"]) == {"sex", "race", "sex*race"}
    assert set(report["by_group"]["sex*race"]) >= {"Female,White", "Male,Black"}
    assert (folder / "by_group_validation.csv").exists() and (
        folder / "by_group_selection_rate_validation.png"
    ).exists()
    metrics = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "fairness/demographic_parity_difference" in metrics and "fairness_penalty/value_epoch" in metrics
