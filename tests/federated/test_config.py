import json
from pathlib import Path

import pytest

from lightning_trust.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_adult_federated_config_runs_one_round(tmp_path):
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "adult_federated.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert code == 0
    report = json.loads(next(tmp_path.rglob("lightning_trust/federated/simulation.json")).read_text())
    assert report["rounds"] == 1 and report["num_clients"] == 10 and report["clients_per_round"] == 5
    assert report["aggregator"] == "FedAvg" and report["partition"]["partition"].startswith("Dirichlet(alpha=0.5")
    assert len(report["per_round"][0]["clients"]) == 5 and 0.0 < report["final_val"]["val/acc"] <= 1.0
    assert report["per_round"][0]["update_norm_mean"] > 0 and len(report["partition"]["sizes"]) == 10
