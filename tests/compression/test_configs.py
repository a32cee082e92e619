import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits_compress.yaml", "adult_compress.yaml"])
def test_compress_configs_parse_with_the_cli(config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_trust", "fit", "--config", str(ROOT / "configs" / config),
                           "--print_config"], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    callbacks = yaml.safe_load(proc.stdout)["trainer"]["callbacks"]
    names = [c["class_path"] for c in callbacks]
    pruning = names.index("lightning_trust.compression.ProgressivePruning")
    qat = names.index("lightning_trust.compression.QuantizationAwareTraining")
    assert pruning < qat  # the order the callbacks require
    assert callbacks[qat]["init_args"]["start_epoch"] > callbacks[pruning]["init_args"]["end_epoch"]
