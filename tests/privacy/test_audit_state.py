"""PrivacyAudit's pieces: the white-box hook adds exactly one clipped gradient per drawn canary,
checkpoints restore the coin, canaries and starting projections, and bad setups fail before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from lightning_trust.core import Capability
from lightning_trust.core.batch import BatchContract
from lightning_trust.privacy import DifferentialPrivacy, PrivacyAudit
from lightning_trust.privacy.audit_canaries import InputCanaries, class_of, loss_or_margin, with_label
from lightning_trust.privacy.audit_gradients import GradientCanaries
from lightning_trust.privacy.optimizer import add_before_noise, wrap_optimizer
from tests.privacy.helpers import TinyData, TinyModule, trainer
from tests.support import Kill


def _noisy_step(model, optimizer, batch=4):
    for p in model.parameters():
        p.grad_sample = torch.zeros(batch, *p.shape)  # every real sample's gradient is zero
    optimizer.step()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_each_drawn_canary_adds_one_clipped_gradient_before_the_noise(clipping):
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    bound = 2.0 if clipping == "flat" else [0.5, 3.0]
    optimizer = wrap_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), 0.0, bound, expected_batch_size=4, clipping=clipping
    )
    canaries = GradientCanaries(num_canaries=8, seed=3, kind="dirac")
    canaries.bind(model)
    add_before_noise(optimizer, lambda opt: canaries.add(opt, step=0, sample_rate=1.0))  # every included canary
    _noisy_step(model, optimizer)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = torch.zeros(21)
    for coordinate, included in zip(canaries.coordinates, canaries.coin):
        if included:  # per-layer: the bound of the canary's layer (weight 0..17, bias 18..20)
            expected[coordinate] = (bound if clipping == "flat" else bound[int(coordinate >= 18)]) / 4
    assert torch.allclose(grad, expected) and canaries.coin.any() and canaries.added.sum() == canaries.coin.sum()


def test_a_gaussian_canary_is_a_unit_direction_at_the_clipping_bound():
    model = torch.nn.Sequential(torch.nn.Linear(5, 2))
    optimizer = wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), 0.0, 1.5, expected_batch_size=1)
    canaries = GradientCanaries(num_canaries=4, seed=0, kind="gaussian")
    canaries.bind(model)
    canaries.coin[:] = [True, False, False, False]
    add_before_noise(optimizer, lambda opt: canaries.add(opt, step=0, sample_rate=1.0))
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    canaries.start(model)
    _noisy_step(model, optimizer, batch=1)
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert grad.norm().item() == pytest.approx(1.5)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert np.allclose(canaries.scores(model)[0], -float((after - before).double() @ canaries._direction(0)))
    assert canaries.scores(model)[0] == pytest.approx(1.5)  # SGD at lr 1 moved θ by -1.5 u


def test_input_canaries_are_held_out_relabeled_and_restored_from_state():
    data = TensorDataset(torch.randn(50, 2), torch.arange(50) % 4)
    canaries = InputCanaries(num_canaries=10, seed=5)
    canaries.draw(data, BatchContract(), num_classes=4)
    train = canaries.training_set(data)
    assert len(set(canaries.sources.tolist())) == 10 and len(train) == 40 + int(canaries.coin.sum())
    assert not set(train.keep) & set(canaries.sources.tolist())
    own = data.tensors[1][canaries.sources].numpy()
    assert (canaries.labels != own).all() and ((canaries.labels >= 0) & (canaries.labels < 4)).all()
    again = InputCanaries(num_canaries=10, seed=0)  # another seed: the state wins
    again.load_state_dict(canaries.state_dict())
    again.draw(data, BatchContract(), num_classes=4)
    assert np.array_equal(again.sources, canaries.sources) and np.array_equal(again.coin, canaries.coin)
    with pytest.raises(ValueError, match="drawn from 50"):
        again.draw(TensorDataset(torch.randn(60, 2), torch.zeros(60)), BatchContract(), num_classes=4)
    sample = with_label({"x": torch.ones(2), "y": torch.tensor(1)}, BatchContract(), 3)
    assert sample["y"].dtype == torch.int64 and int(sample["y"]) == 3
    with pytest.raises(ValueError, match="one class label per sample"):
        class_of(torch.arange(5))


def test_scores_are_minus_the_loss_or_the_margin():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(loss_or_margin(logits, labels, "loss"), -loss)
    assert loss_or_margin(logits, labels, "margin").tolist() == [2.0, -2.0]
    binary = loss_or_margin(torch.tensor([2.0, -1.0]), torch.tensor([1, 1]), "margin")
    assert binary.tolist() == [2.0, -1.0]


def _gradient_audit():
    return PrivacyAudit(num_canaries=20, canaries="gradient", seed=1)


def _dp():
    return DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp")


@pytest.mark.slow
def test_kill_and_resume_keeps_the_coin_the_canaries_and_their_draws(tmp_path):
    full = _gradient_audit()
    trainer(tmp_path / "full", max_steps=25, callbacks=[_dp(), full]).fit(TinyModule(hidden=8), TinyData())

    ckpts = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    killed = _gradient_audit()
    with pytest.raises(RuntimeError, match="killed"):
        trainer(
            tmp_path / "a", max_steps=25, enable_checkpointing=True, callbacks=[_dp(), killed, saver, Kill(17)]
        ).fit(TinyModule(hidden=8), TinyData())

    resumed = PrivacyAudit(num_canaries=20, canaries="gradient", seed=9)  # the checkpoint's draw wins over the seed
    trainer(tmp_path / "b", max_steps=25, callbacks=[_dp(), resumed]).fit(
        TinyModule(hidden=8), TinyData(), ckpt_path=ckpts / "step=14.ckpt"
    )
    a, b = full._gradients, resumed._gradients
    assert np.array_equal(a.coin, b.coin) and np.array_equal(a.coordinates, b.coordinates)
    assert np.array_equal(killed._gradients.initial, b.initial)  # θ_0 of the killed run, not the checkpoint's θ
    assert resumed.canary_steps == full.canary_steps  # the draws of steps 15..25 continue from (seed, step)
    assert resumed.report()["guesses"] is not None


@pytest.mark.slow
def test_input_canaries_resume_with_the_same_training_set(tmp_path):
    first = PrivacyAudit(num_canaries=20, seed=2)
    t = trainer(tmp_path, max_steps=5, callbacks=[first])
    t.fit(TinyModule(), TinyData())
    path = tmp_path / "audit.ckpt"
    t.save_checkpoint(path)
    resumed = PrivacyAudit(num_canaries=20, seed=7)
    trainer(tmp_path, max_steps=8, callbacks=[resumed]).fit(TinyModule(), TinyData(), ckpt_path=path)
    assert np.array_equal(resumed._inputs.sources, first._inputs.sources)
    assert np.array_equal(resumed.included, first.included) and resumed.training_samples == first.training_samples
    # a checkpoint without audit state: the canaries' sources were trained on, so the audit refuses
    plain = tmp_path / "plain.ckpt"
    t2 = trainer(tmp_path, max_steps=2)
    t2.fit(TinyModule(), TinyData())
    t2.save_checkpoint(plain)
    with pytest.raises(ValueError, match="holds no PrivacyAudit state"):
        trainer(tmp_path, max_steps=4, callbacks=[PrivacyAudit(num_canaries=20)]).fit(
            TinyModule(), TinyData(), ckpt_path=plain
        )


class WeightedData(TinyData):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=24, sampler=WeightedRandomSampler([1.0] * 240, 240))


@pytest.mark.parametrize(
    ("callbacks", "data", "match"),
    [
        (lambda: [_gradient_audit()], TinyData, "has no DifferentialPrivacy callback"),
        (lambda: [PrivacyAudit(num_canaries=200)], TinyData, "at most half the training set"),
        (lambda: [PrivacyAudit(num_canaries=20)], WeightedData, "WeightedRandomSampler"),
        (
            lambda: [PrivacyAudit(num_canaries=20), DifferentialPrivacy(noise_multiplier=1.0, dataset_size=240)],
            TinyData,
            "dataset_size=240",
        ),
    ],
)
def test_bad_setups_fail_before_training(tmp_path, callbacks, data, match):
    model = TinyModule()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, max_steps=3, callbacks=callbacks()).fit(model, data())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_arguments_and_declarations():
    for kwargs, match in [
        ({"num_canaries": 1}, "num_canaries"),
        ({"canaries": "output"}, "canaries"),
        ({"confidence": 1.0}, "confidence"),
        ({"k_plus": 0, "k_minus": 0}, "at least 1"),
        ({"num_canaries": 10, "k_plus": 8, "k_minus": 5}, "exceed"),
        ({"delta": 1.5}, "delta"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            PrivacyAudit(**kwargs)
    assert Capability.REPLACES_TRAIN_LOADER in PrivacyAudit().capabilities
    assert Capability.EDITS_GRADIENTS in PrivacyAudit(canaries="gradient").capabilities
    assert Capability.FEDERATED_ROUNDS in PrivacyAudit().refuses
    assert Capability.CHANGES_PARAMETERS in PrivacyAudit(canaries="gradient").refuses
    assert PrivacyAudit(name="audit_main").report_name == "audit_main"
    section = PrivacyAudit().report()  # before fit: nothing measured, nothing made up
    assert section["epsilon_lower_bound"] is None and section["guesses"] is None and section["figures"] == {}
