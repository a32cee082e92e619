"""Bad configurations fail early, naming the problem and the fix."""

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import TinyData, TinyModule, tiny_data, trainer


class Stream(IterableDataset):
    def __iter__(self):
        data = tiny_data(64)
        return iter([data[i] for i in range(len(data))])


class StreamData(TinyData):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Stream(), batch_size=16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `target_epsilon`"),
        ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, "exactly one of `target_epsilon`"),
        ({"target_epsilon": -1.0}, "`target_epsilon` must be > 0"),
        ({"noise_multiplier": 1.0, "target_delta": 2.0}, "`target_delta` must be in (0, 1)"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "`max_grad_norm` must be a finite positive"),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, "`accountant` must be one of"),
        (
            {"noise_multiplier": 1.0, "grad_sample_mode": "ghost", "clipping": "per_layer"},
            "ghost clipping supports only",
        ),
        ({"noise_multiplier": 1.0, "max_physical_batch_size": 0}, "`max_physical_batch_size` must be"),
        ({"noise_multiplier": 1.0, "max_grad_norm": [1.0, 2.0]}, "needs `clipping='per_layer'`"),
        ({"noise_multiplier": 1.0, "max_grad_norm": float("inf")}, "`max_grad_norm` must be a finite positive"),
        ({"noise_multiplier": 1.0, "max_grad_norm": float("nan")}, "`max_grad_norm` must be a finite positive"),
        ({"noise_multiplier": 1.0, "max_grad_norm": "1.0"}, "`max_grad_norm` must be a finite positive"),
        ({"noise_multiplier": 1.0, "max_grad_norm": True}, "`max_grad_norm` must be a finite positive"),
        ({"target_epsilon": "3.0"}, "`target_epsilon` must be a number, got '3.0' (str); pass a float"),
        ({"target_epsilon": float("inf")}, "`target_epsilon` must be finite, got inf; for no noise"),
        ({"target_epsilon": float("nan")}, "`target_epsilon` must be finite"),
        ({"target_epsilon": 3.0, "target_delta": "1e-5"}, "`target_delta` must be a number"),
        ({"target_epsilon": 3.0, "target_delta": float("nan")}, "`target_delta` must be finite"),
        ({"noise_multiplier": "1"}, "`noise_multiplier` must be a number"),
        ({"noise_multiplier": float("inf")}, "`noise_multiplier` must be finite"),
        ({"noise_multiplier": float("nan")}, "`noise_multiplier` must be finite"),
        ({"noise_multiplier": 1.0, "stop_at_epsilon": "2"}, "`stop_at_epsilon` must be a number"),
        ({"noise_multiplier": 1.0, "stop_at_epsilon": float("inf")}, "stop_at_epsilon=None for no budget"),
        ({"noise_multiplier": 1.0, "epsilon_tolerance": float("nan")}, "`epsilon_tolerance` must be finite"),
        ({"noise_multiplier": 1.0, "epsilon_tolerance": 0.0}, "`epsilon_tolerance` must be > 0"),
        ({"noise_multiplier": 1.0, "max_physical_batch_size": 2.5}, "`max_physical_batch_size` must be a positive int"),
        ({"noise_multiplier": 1.0, "dataset_size": "100"}, "`dataset_size` must be a positive integer"),
        ({"noise_multiplier": 1.0, "dataset_size": True}, "`dataset_size` must be a positive integer"),
        ({"noise_multiplier": 1.0, "log_every_n_steps": 0}, "`log_every_n_steps` must be a positive integer"),
        ({"noise_multiplier": 1.0, "poisson_sampling": "False"}, "`poisson_sampling` must be True or False"),
        ({"noise_multiplier": 1.0, "secure_rng": 0}, "`secure_rng` must be True or False"),
        ({"noise_multiplier": 1.0, "fix_module": None}, "`fix_module` must be True or False"),
        ({"noise_multiplier": 1.0, "accountant": ["rdp"]}, "`accountant` must be a string"),
        ({"noise_multiplier": 1.0, "clipping": None}, "`clipping` must be a string"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DifferentialPrivacy(**kwargs)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_impossible_target_is_refused_with_the_reason(tmp_path, accountant):
    dp = DifferentialPrivacy(target_epsilon=1e-7, target_delta=1e-9, accountant=accountant)
    with pytest.raises(ValueError, match="cannot be reached in 100 steps at sample rate 0.1"):
        trainer(tmp_path, max_epochs=10, callbacks=[dp]).fit(TinyModule(), TinyData())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"noise_multiplier": 1.0, "target_delta": 1e-30}, r"Floating point errors.*accountant='rdp'"),
        ({"noise_multiplier": 1.0, "target_delta": 5e-324}, "ZeroDivisionError"),
        ({"target_epsilon": 3.0, "target_delta": 1e-30}, r"Floating point errors.*accountant='rdp'"),
        ({"target_epsilon": 3.0, "target_delta": 0.99}, "Cannot compute epsilon"),
        ({"noise_multiplier": 1.0, "target_delta": 0.99, "accountant": "rdp"}, "δ is too large"),
        ({"target_epsilon": 3.0, "target_delta": 0.5, "accountant": "gdp"}, "f\\(a\\) and f\\(b\\)"),
    ],
)
def test_a_delta_opacus_cannot_account_is_refused_before_training(tmp_path, options, message):
    dp = DifferentialPrivacy(**{"accountant": "prv", **options})
    t = trainer(tmp_path, max_epochs=1, callbacks=[dp])
    with pytest.raises(ValueError, match=r"target_delta=.* cannot be accounted .*Set target_delta") as refused:
        t.fit(TinyModule(), TinyData())
    assert re.search(message, str(refused.value)), refused.value
    assert t.global_step == 0 and dp.steps == 0


def test_iterable_dataset_is_refused_unless_shuffling_is_accepted(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    with pytest.raises(ValueError, match="IterableDataset.*poisson_sampling=False"):
        trainer(tmp_path, max_steps=2, callbacks=[dp]).fit(TinyModule(), StreamData())
    dp = DifferentialPrivacy(noise_multiplier=1.0, poisson_sampling=False, dataset_size=64)
    trainer(tmp_path, max_steps=2, callbacks=[dp]).fit(TinyModule(), StreamData())
    assert dp.steps == 2 and dp.report()["sampling"] == "shuffle" and dp.delta == pytest.approx(1 / 64)


def test_missing_delta_without_dataset_size_is_refused(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, poisson_sampling=False)
    with pytest.raises(ValueError, match="No `target_delta` was given and the training set size is unknown"):
        trainer(tmp_path, max_steps=2, callbacks=[dp]).fit(TinyModule(), StreamData())


def test_target_epsilon_needs_a_planned_length(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=1.0, target_delta=1e-3)
    with pytest.raises(ValueError, match="needs a planned training length"):
        trainer(tmp_path, max_epochs=-1, callbacks=[dp]).fit(TinyModule(), TinyData())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
        ({"precision": "16-true"}, "fp16 loss scaling"),
        ({"accumulate_grad_batches": 2}, "ghost clipping takes one backward"),
    ],
)
def test_trainer_settings_that_break_dp_are_refused(tmp_path, options, message):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, grad_sample_mode="ghost")
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, max_steps=1, callbacks=[dp], **options).fit(TinyModule(), TinyData())


class TwoOptimizers(TinyModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]


def test_several_optimizers_are_refused(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    with pytest.raises(ValueError, match="wraps one optimizer"):
        trainer(tmp_path, max_steps=1, callbacks=[dp]).fit(TwoOptimizers(), TinyData())


@pytest.mark.slow
def test_batchnorm_is_refused_with_the_offending_layers_and_fixed_on_request(tmp_path, digits):
    from lightning_trust.demo import DigitsDataModule, SmallCNN

    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-5)
    with pytest.raises(
        ValueError, match=r"(?s)SmallCNN has layers that break per-sample gradients.*BatchNorm.*fix_module=True"
    ):
        trainer(tmp_path, max_steps=1, callbacks=[dp]).fit(SmallCNN(batch_norm=True), DigitsDataModule(batch_size=64))

    model = SmallCNN(batch_norm=True)
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-5, fix_module=True)
    trainer(tmp_path, max_steps=3, callbacks=[dp]).fit(model, DigitsDataModule(batch_size=64))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert dp.steps == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_secure_rng_without_torchcsprng_is_refused():
    import importlib.util

    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed")
    with pytest.raises(ValueError, match="needs cryptographically secure randomness from `torchcsprng`"):
        DifferentialPrivacy(noise_multiplier=1.0, secure_rng=True)
