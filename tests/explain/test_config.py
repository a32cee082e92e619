import json
from pathlib import Path

import pytest

from lightning_trust.cli import main

ROOT = Path(__file__).resolve().parents[2]

ADULT_SNIPPET = """
    - class_path: Attribution
      init_args:
        method: integrated_gradients
        num_samples: 64
        target: pred
        baseline: mean
        top_k: 15
"""


@pytest.mark.slow
def test_digits_explain_config_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative run folders land here
    # the shortened fit (3 batches) is far too short for the default 5% overhead budget to take the end
    # pass's sensitivity_max: run every pass (max_overhead: null) so the test checks it
    config = (ROOT / "configs" / "digits_explain.yaml").read_text()
    config = config.replace(
        "        sensitivity_at: end\n", "        sensitivity_at: end\n        max_overhead: null\n", 1
    )
    path = tmp_path / "digits_explain.yaml"
    path.write_text(config)
    code = main(
        [
            "fit",
            "--config",
            str(path),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    explain = next(tmp_path.rglob("lightning_trust/explain"))
    assert (explain / "heatmaps.png").is_file() and (explain / "importance.csv").is_file()
    history = json.loads((explain / "history.json").read_text())
    # every_n_epochs=3 skipped the only epoch; the end pass still explains the final model
    assert [h["stage"] for h in history] == ["fit_end"] and history[-1]["sensitivity_max"] is not None
    robustness = json.loads(next(tmp_path.rglob("lightning_trust/robustness/robustness.json")).read_text())
    assert set(robustness["last"]["robust_accuracy"]) == {"fgsm", "pgd"}
    assert next(tmp_path.rglob("events.out.tfevents.*")).is_file()


@pytest.mark.slow
def test_adult_attribution_snippet_uses_real_feature_names(tmp_path):
    """The YAML documented for configs/adult.yaml (readme.d/explain.md) parses and names Adult's features."""
    config = (ROOT / "configs" / "adult.yaml").read_text()
    if "class_path: Attribution" not in config:
        config = config.replace("  callbacks:\n", "  callbacks:" + ADULT_SNIPPET, 1)
    path = tmp_path / "adult_explain.yaml"
    path.write_text(config)
    code = main(
        [
            "fit",
            "--config",
            str(path),
            "--trainer.max_epochs=5",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert code == 0
    importance = json.loads(next(tmp_path.rglob("lightning_trust/explain/importance.json")).read_text())
    names = [item["feature"] for item in importance["importance"]]
    assert len(names) == 104 and "age" in names and any(n.startswith("marital-status=") for n in names)
    assert next(tmp_path.rglob("lightning_trust/explain/feature_importance.png")).is_file()
