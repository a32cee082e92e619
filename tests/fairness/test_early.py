"""Bad sensitive columns, targets and predictions are refused before any optimizer step."""

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_trust.core.batch import BatchKeyError
from lightning_trust.fairness import FairnessMetrics, ThresholdOptimizer
from tests.fairness.helpers import LogitModule, SyntheticDataModule, synthetic
from tests.support import trainer


class Steps(Callback):
    steps = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        Steps.steps += 1


def _fit(tmp_path, callback, data, module=None, **kwargs):
    Steps.steps = 0
    t = trainer(tmp_path, callbacks=[callback, Steps()], max_epochs=1, limit_train_batches=2, **kwargs)
    try:
        t.fit(module or LogitModule(), SyntheticDataModule(data))
    finally:
        assert Steps.steps == 0 and t.global_step == 0


@pytest.mark.parametrize("sanity", [2, 0])  # checked in the sanity pass, else on a probe batch at train start
def test_missing_column_refused_before_training(tmp_path, sanity):
    with pytest.raises(BatchKeyError, match=r"sensitive feature 'gender' is missing.*batch_keys: \{gender: <key>\}"):
        _fit(tmp_path, FairnessMetrics("gender"), synthetic(n=128), num_sanity_val_steps=sanity)


@pytest.mark.parametrize("callback", [FairnessMetrics, ThresholdOptimizer])
def test_float_column_refused_before_training(tmp_path, callback):
    data = {**synthetic(n=128), "age": torch.rand(128) * 60 + 20}
    with pytest.raises(TypeError, match=r"'age' holds torch.float32 .*datamodule.categories\['age'\]"):
        _fit(tmp_path, callback("age"), data, num_sanity_val_steps=0)


def test_code_outside_the_named_groups_refused(tmp_path):
    data = synthetic(n=128)
    data["race"][5] = 7  # categories name 3 races
    with pytest.raises(ValueError, match=r"'race' has the code 7, outside its 3 groups.*num_groups"):
        _fit(tmp_path, FairnessMetrics("race"), data, num_sanity_val_steps=0)


def test_unnamed_column_uses_num_groups(tmp_path):
    data = {**synthetic(n=128), "region": torch.arange(128) % 40}
    with pytest.raises(ValueError, match=r"'region' has the code 3\d, outside its 32 groups"):
        _fit(tmp_path, FairnessMetrics("region"), data)
    cb = FairnessMetrics("region", num_groups={"region": 40}, min_group_size=0)
    trainer(tmp_path, callbacks=[cb]).validate(LogitModule(), SyntheticDataModule(data), verbose=False)
    assert len(cb.report()["by_group"]["region"]) == 40


def test_no_validation_step_refused_at_setup(tmp_path):
    class NoValidation(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return (batch["x"] * self.scale).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = NoValidation()
    with pytest.raises(RuntimeError, match=r"defines no `validation_step`\. Add a `validation_step`"):
        _fit(tmp_path, FairnessMetrics("sex"), synthetic(n=64), module=module)


def test_token_level_predictions_refused(tmp_path):
    class TokenLogits(LogitModule):
        def forward(self, x):
            return super().forward(x)[:, None, :].expand(-1, 5, -1)  # [B, L, V]

        def training_step(self, batch, batch_idx):
            return super().forward(batch["x"]).sum() * 0

    with pytest.raises(ValueError, match=r"shape \(64, 5, 2\).*sequence-classification head"):
        _fit(tmp_path, FairnessMetrics("sex"), synthetic(n=128), module=TokenLogits(), num_sanity_val_steps=0)
