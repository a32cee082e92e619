"""Checkpoints: a killed-and-resumed run ends with the same ε; the budget stops training cleanly."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from opacus.accountants import create_accountant

from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import TinyData, TinyModule, trainer
from tests.support import Kill


def _dp():
    return DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp", log_every_n_steps=1)


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_same_epsilon(tmp_path):
    full = _dp()
    trainer(tmp_path / "full", max_steps=25, callbacks=[full]).fit(TinyModule(), TinyData())

    ckpts = tmp_path / "ckpt"
    first = _dp()
    saver = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match="killed"):
        trainer(
            tmp_path / "a", max_steps=25, enable_checkpointing=True, callbacks=[first, saver, Kill(at_step=17)]
        ).fit(TinyModule(), TinyData())
    assert first.steps == 17
    checkpoint = torch.load(ckpts / "step=14.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["DifferentialPrivacy"]
    assert state["accountant"]["history"] == [(full.noise_multiplier, 0.1, 14)]

    resumed = _dp()
    trainer(tmp_path / "b", max_steps=25, callbacks=[resumed]).fit(
        TinyModule(), TinyData(), ckpt_path=ckpts / "step=14.ckpt"
    )
    assert resumed.steps == full.steps == 25
    assert resumed.noise_multiplier == full.noise_multiplier  # restored, not recomputed
    assert abs(resumed.epsilon_spent - full.epsilon_spent) < 1e-9
    assert [s for s, _ in resumed.report()["epsilon_curve"]][:14] == list(range(1, 15))  # the curve continues


def test_loading_a_dp_checkpoint_without_the_callback_warns(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    t = trainer(tmp_path, max_steps=3, callbacks=[dp])
    t.fit(TinyModule(), TinyData())
    path = tmp_path / "dp.ckpt"
    t.save_checkpoint(path)
    with pytest.warns(UserWarning, match="DifferentialPrivacy"):
        trainer(tmp_path, max_steps=4).fit(TinyModule(), TinyData(), ckpt_path=path)


def test_resuming_a_plain_checkpoint_with_the_callback_warns(tmp_path):
    t = trainer(tmp_path, max_steps=2)
    t.fit(TinyModule(), TinyData())
    path = tmp_path / "plain.ckpt"
    t.save_checkpoint(path)
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    with pytest.warns(UserWarning, match="holds no DifferentialPrivacy state"):
        trainer(tmp_path, max_steps=4, callbacks=[dp]).fit(TinyModule(), TinyData(), ckpt_path=path)
    assert dp.steps == 2


def test_stop_at_epsilon_stops_before_exceeding_and_saves_a_checkpoint(tmp_path):
    reference = create_accountant("rdp")
    for _ in range(7):
        reference.step(noise_multiplier=1.0, sample_rate=0.1)
    budget = reference.get_epsilon(delta=1e-3) + 1e-9
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp", stop_at_epsilon=budget)
    t = trainer(tmp_path, max_epochs=5, callbacks=[dp])
    t.fit(TinyModule(), TinyData())
    assert dp.steps == 7 == t.global_step and dp.stopped_at_budget
    assert dp.epsilon_spent <= budget
    assert dp.checkpoint_path and torch.load(dp.checkpoint_path, weights_only=False)["global_step"] == 7
    assert dp.report()["stopped_at_budget"] is True


def test_a_second_fit_with_the_same_callback_composes_the_budget(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp")
    model, data = TinyModule(), TinyData()
    trainer(tmp_path, max_steps=3, callbacks=[dp]).fit(model, data)
    trainer(tmp_path, max_steps=4, callbacks=[dp]).fit(model, data)
    reference = create_accountant("rdp")
    for _ in range(7):
        reference.step(noise_multiplier=1.0, sample_rate=0.1)
    assert dp.steps == 7 and abs(dp.epsilon_spent - reference.get_epsilon(delta=1e-3)) < 1e-9


def test_a_second_fit_cannot_spend_past_the_target(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    model, data = TinyModule(), TinyData()
    trainer(tmp_path, max_steps=10, callbacks=[dp]).fit(model, data)
    assert dp.steps == 10 and dp.epsilon_spent <= 2.0
    with pytest.warns(UserWarning, match="already spent"):
        trainer(tmp_path, max_steps=10, callbacks=[dp]).fit(model, data)
    assert dp.steps == 10 and dp.stopped_at_budget and dp.epsilon_spent <= 2.0
