"""`fail_on_breach` makes the `lightning-trust` command exit non-zero; the card is written anyway."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
seed_everything: 7
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 4
  limit_val_batches: 2
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  default_root_dir: {root}
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {root}, name: ""}}
  callbacks:
    - class_path: TrustReport
      init_args:
        fail_on_breach: true
        standards:
          model.params: {{max: 1000000}}
          metrics.val/acc: {{min: 0.999}}
model:
  class_path: TabularMLP
  init_args: {{hidden_dims: [16]}}
data:
  class_path: AdultDataModule
  init_args: {{batch_size: 128}}
"""


@pytest.mark.slow
def test_fail_on_breach_exits_non_zero_from_the_cli_and_still_writes_the_card(tmp_path):
    config = tmp_path / "breach.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    script = Path(sys.executable).with_name("lightning-trust")
    proc = subprocess.run([str(script), "fit", "--config", str(config)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    card_dir = tmp_path / "version_0"
    assert all((card_dir / f"model_card.{ext}").is_file() for ext in ("json", "md", "html"))
    card = json.loads((card_dir / "model_card.json").read_text())
    verdicts = {s["name"]: s["status"] for s in card["standards"]}
    assert verdicts == {"model.params": "met", "metrics.val/acc": "not_met"}
    assert card["training"]["seed"] == 7
    # the LightningCLI configuration is in the card
    assert card["training"]["config"]["model"]["init_args"]["hidden_dims"] == [16]
    # the end of the run names the card and the verdicts
    assert f"Model card: {card_dir / 'model_card.html'}" in proc.stdout
    assert "Standards: 1 of 2 standards met; 1 not met: metrics.val/acc." in proc.stdout
    # re-rendering from the JSON through the console script gives the same Markdown, and gates too
    rerender = subprocess.run([str(script), "report", str(card_dir / "model_card.json"), "-o", str(tmp_path / "again"),
                               "--fail-on-breach"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerender.returncode == 1, rerender.stderr
    assert (tmp_path / "again" / "model_card.md").read_bytes() == (card_dir / "model_card.md").read_bytes()
