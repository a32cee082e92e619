"""What the compression callbacks declare: logged and report keys (checked against a real run),
capabilities and refusals, and the overridable policies."""

import re

import lightning.pytorch as pl
import pytest
import torch
import torch_pruning as tp
from lightning.pytorch.loggers import Logger

from lightning_trust.compression import ProgressivePruning, QuantizationAwareTraining
from lightning_trust.core.compat import Capability
from lightning_trust.demo import SmallCNN
from tests.support import trainer


class _Recorder(Logger):
    """Every metric name logged through Lightning's loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.names.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _pattern(key: str) -> re.Pattern:
    return re.compile(
        "".join(".+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]+>)", key))
    )


def _check_declared(callback, logged: set[str]) -> None:
    report = {k: v for k, v in callback.report().items() if k != "figures"}
    declared = [_pattern(k) for k in callback.report_keys]
    assert [k for k in report if not any(p.fullmatch(k) for p in declared)] == []  # every report key is declared
    assert [k for k in callback.report_keys if not any(_pattern(k).fullmatch(r) for r in report)] == []  # and present
    patterns = [_pattern(k) for k in callback.logged_keys]
    mine = {n for n in logged if n.split("/", 1)[0] == callback.report_section}
    assert mine and [n for n in mine if not any(p.fullmatch(n) for p in patterns)] == []


@pytest.mark.slow
def test_logged_and_report_keys_match_a_real_run(tmp_path, digits):
    pl.seed_everything(0)
    recorder = _Recorder()
    pruning = ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=0)
    qat = QuantizationAwareTraining(start_epoch=1, compile=False)
    fit = trainer(tmp_path, [pruning, qat], max_epochs=2, logger=recorder, limit_train_batches=3, limit_val_batches=2)
    fit.fit(SmallCNN(), digits)
    _check_declared(pruning, recorder.names)
    _check_declared(qat, recorder.names)
    assert {"compression/params", "quantization/agreement"} <= recorder.names


def test_capabilities_and_refusals_follow_the_arguments():
    plain, regularized = ProgressivePruning(), ProgressivePruning(sparsity_regularization=1e-4)
    assert plain.capabilities == {Capability.CHANGES_PARAMETERS, Capability.EXTRA_PASSES}
    assert regularized.capabilities == plain.capabilities | {Capability.EDITS_GRADIENTS}
    assert plain.refuses == {}
    assert "sparsity_regularization: 0" in regularized.refuses[Capability.PER_SAMPLE_GRADIENTS]
    qat = QuantizationAwareTraining()
    assert qat.capabilities == {Capability.EXPORTED_GRAPH} and set(qat.refuses) == {Capability.PER_SAMPLE_GRADIENTS}
    assert ProgressivePruning(name="pruning_a").report_name == "pruning_a"
    assert QuantizationAwareTraining(name="int8").report_name == "int8"


class _L1Linear(ProgressivePruning):
    def importance_for(self, model):
        return tp.importance.GroupMagnitudeImportance(p=1)

    def ratio_at(self, epoch, max_epochs=None):
        return 0.25 if epoch >= self.start_epoch else 0.0


def test_overridden_policies_drive_the_pruning_step(digits):
    from tests.compression.test_pruning import _fake_trainer

    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = _L1Linear(pruning_ratio=0.5, schedule="one_shot", start_epoch=0, measure_latency=False, evaluate=False)
    assert cb.targets(max_epochs=2) == [0.25]
    cb._contract = None
    cb._example = torch.rand(4, 1, 8, 8)
    cb.on_train_batch_end(_fake_trainer(optimizer), model, None, None, 0)
    assert isinstance(cb._pruner.importance, tp.importance.GroupMagnitudeImportance) and cb._pruner.importance.p == 1
    assert model.features[0].out_channels == 24 and cb.report()["channel_ratio"] == 0.25
