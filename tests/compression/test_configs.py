from pathlib import Path

import pytest

from lightning_trust.compression import ProgressivePruning, QuantizationAwareTraining

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", ["digits_compress.yaml", "adult_compress.yaml"])
def test_compress_configs_build_the_chained_callbacks(config, tmp_path, monkeypatch):
    from lightning_trust.cli import TrustCLI
    from lightning_trust.registry import import_callbacks

    monkeypatch.chdir(tmp_path)
    import_callbacks()
    cli = TrustCLI(args=["--config", str(ROOT / "configs" / config)], run=False)
    callbacks = cli.trainer.callbacks
    pruning = next(c for c in callbacks if isinstance(c, ProgressivePruning))
    qat = next(c for c in callbacks if isinstance(c, QuantizationAwareTraining))
    assert callbacks.index(pruning) < callbacks.index(qat)  # the order the callbacks require
    assert pruning.events(cli.trainer.max_epochs)[-1] < qat.start_epoch < cli.trainer.max_epochs
    assert pruning.pruning_ratio == 0.5 and qat.export_path.endswith("_int8.pt2")
