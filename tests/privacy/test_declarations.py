"""What DifferentialPrivacy declares (capabilities, logged and report keys, policy methods) is what it does."""

import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from opacus.accountants import create_accountant

from lightning_trust.core import Capability, IncompatibleCallbacksError, TrustCallback, collect_reports
from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import TinyData, TinyModule, trainer


def _pattern(key: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"<[^>]+>", ".+", re.escape(key).replace(r"\<", "<").replace(r"\>", ">")) + "$")


class LoggedNames(Callback):
    """Every metric name that reaches the Trainer's loggers."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.names |= set(trainer.logged_metrics)

    def on_train_end(self, trainer, pl_module):
        self.names |= set(trainer.logged_metrics)


def test_declared_keys_match_a_real_run(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, log_every_n_steps=2)
    names = LoggedNames()
    t = trainer(tmp_path, max_steps=6, callbacks=[dp, names], logger=CSVLogger(tmp_path))
    t.fit(TinyModule(), TinyData())
    report = dp.report()
    keys = set(report) - {"figures"}
    assert keys == set(DifferentialPrivacy.report_keys)
    patterns = [_pattern(key) for key in DifferentialPrivacy.logged_keys]
    ours = names.names - {"train/loss"}  # the user module's own metric
    assert ours and all(any(p.match(name) for p in patterns) for name in ours)
    assert ours == set(DifferentialPrivacy.logged_keys)


def test_capabilities_and_the_report_name():
    dp = DifferentialPrivacy(noise_multiplier=1.0, name="privacy_main")
    assert isinstance(dp, TrustCallback)
    assert {
        Capability.PER_SAMPLE_GRADIENTS,
        Capability.REPLACES_TRAIN_LOADER,
        Capability.NEEDS_INDEPENDENT_LOSSES,
    } <= dp.capabilities
    assert dp.report_name == "privacy_main" and DifferentialPrivacy(noise_multiplier=1.0).report_name == "privacy"
    with pytest.raises(ValueError, match="short identifier"):
        DifferentialPrivacy(noise_multiplier=1.0, name="privacy.main")


def test_a_named_section_reaches_the_report(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, name="privacy_main")
    t = trainer(tmp_path, max_steps=2, callbacks=[dp])
    t.fit(TinyModule(), TinyData())
    assert collect_reports(t)["privacy_main"]["steps"] == 2


class RefusesPerSampleGradients(Callback):
    refuses = {Capability.PER_SAMPLE_GRADIENTS: "it couples the samples of a batch; train without DP"}


def test_a_callback_refusing_per_sample_gradients_is_refused_by_the_checker(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    with pytest.raises(IncompatibleCallbacksError, match="RefusesPerSampleGradients cannot train in the same fit"):
        trainer(tmp_path, max_steps=1, callbacks=[dp, RefusesPerSampleGradients()]).fit(TinyModule(), TinyData())


class MoreNoise(DifferentialPrivacy):
    def noise_plan(self, sample_rate, steps):
        self.asked = (sample_rate, steps)
        return 1.5 * super().noise_plan(sample_rate, steps)


def test_noise_plan_override_is_used_and_accounted(tmp_path):
    base = DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    sigma = base.noise_plan(0.1, 20)
    dp = MoreNoise(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    t = trainer(tmp_path, max_epochs=2, callbacks=[dp])
    t.fit(TinyModule(), TinyData(n=240, batch_size=24))
    assert dp.asked == (pytest.approx(0.1), 20)
    assert dp.noise_multiplier == pytest.approx(1.5 * sigma) and dp.steps == 20
    reference = create_accountant("rdp")
    for _ in range(20):
        reference.step(noise_multiplier=1.5 * sigma, sample_rate=0.1)
    assert dp.epsilon_spent == pytest.approx(reference.get_epsilon(delta=1e-3)) and dp.epsilon_spent < 2.0


class NegativeNoise(DifferentialPrivacy):
    def noise_plan(self, sample_rate, steps):
        return -1.0


def test_a_bad_noise_plan_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`noise_plan` must return"):
        trainer(tmp_path, max_steps=1, callbacks=[NegativeNoise(noise_multiplier=1.0, target_delta=1e-3)]).fit(
            TinyModule(), TinyData()
        )


class FirstLayerTight(DifferentialPrivacy):
    def clip_plan(self, params):
        return [0.01] + [10.0] * (len(params) - 1)


def test_clip_plan_override_reaches_the_dp_optimizer(tmp_path):
    dp = FirstLayerTight(noise_multiplier=0.0, target_delta=1e-3, clipping="per_layer")
    optimizers = []

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            optimizers.append(optimizer)

    trainer(tmp_path, max_steps=1, callbacks=[dp, Grab()]).fit(TinyModule(hidden=3), TinyData())
    assert optimizers[0].max_grad_norms == [0.01, 10.0, 10.0, 10.0]
    assert dp.clip_norms == [0.01, 10.0, 10.0, 10.0]
    assert dp.report()["max_grad_norm"] == pytest.approx(torch.tensor([0.01, 10.0, 10.0, 10.0]).norm().item())
