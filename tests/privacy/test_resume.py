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


def _without_paths(report):
    return {k: v for k, v in report.items() if k != "figures"}


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_run_resumed_mid_epoch_counts_the_batches_already_done(tmp_path, accountant):
    def dp():
        return DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant=accountant, log_every_n_steps=1)

    full = dp()
    trainer(tmp_path / "full", max_epochs=3, callbacks=[full]).fit(TinyModule(), TinyData())
    assert full.steps == full.planned_steps == 30 and not full.stopped_at_budget

    ckpts = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match="killed"):
        trainer(tmp_path / "a", max_epochs=3, enable_checkpointing=True, callbacks=[dp(), saver, Kill(at_step=17)]).fit(
            TinyModule(), TinyData()
        )
    resumed = dp()
    t = trainer(tmp_path / "b", max_epochs=3, callbacks=[resumed])
    t.fit(TinyModule(), TinyData(), ckpt_path=ckpts / "step=14.ckpt")  # epoch 1, 4 of its 10 batches done
    assert t.global_step == resumed.steps == 30
    assert resumed.planned_steps == 30 and resumed.stopped_at_budget is False and resumed.checkpoint_path is None
    assert not list((tmp_path / "b").rglob("budget_reached.ckpt"))
    assert resumed.epsilon_spent == pytest.approx(full.epsilon_spent, abs=1e-12)
    assert _without_paths(resumed.report()) == _without_paths(full.report())


def test_an_end_of_epoch_resume_plans_the_remaining_epochs(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    ckpts = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpts, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    with pytest.raises(RuntimeError, match="killed"):
        trainer(
            tmp_path / "a", max_epochs=3, enable_checkpointing=True, callbacks=[dp, saver, Kill(after_epoch=1)]
        ).fit(TinyModule(), TinyData())
    resumed = DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    t = trainer(tmp_path / "b", max_epochs=3, callbacks=[resumed])
    t.fit(TinyModule(), TinyData(), ckpt_path=ckpts / "epoch=0.ckpt")
    assert resumed.planned_steps == 30 == resumed.steps == t.global_step and not resumed.stopped_at_budget


def test_limit_train_batches_is_the_planned_epoch(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant="rdp")
    trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[dp]).fit(TinyModule(), TinyData())
    assert dp.planned_steps == 6 == dp.steps and not dp.stopped_at_budget
    assert 2.0 - 0.01 <= dp.epsilon_spent <= 2.0  # the noise was planned for the 6 steps taken
