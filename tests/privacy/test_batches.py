"""Poisson sampling, accumulate_grad_batches and virtual (physical) batches."""

import math
from typing import Any

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import BatchRecorder, TinyData, TinyModule, hand_update, trainer


def _tagging_collate(samples: list[Any]) -> Any:
    x, y = default_collate(samples)
    return x, y, torch.full((len(y),), 7)


class TaggedData(TinyData):
    """A user loader with its own collate_fn (adds a third field)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, collate_fn=_tagging_collate)


class TaggedModule(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, tag = batch
        assert bool((tag == 7).all())
        return super().training_step((x, y), batch_idx)


def test_poisson_sampler_replaces_the_loader_and_keeps_dataset_and_collate(tmp_path):
    recorder = BatchRecorder()
    dm = TaggedData(n=400, batch_size=20)
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    t = trainer(tmp_path, max_epochs=1, callbacks=[dp, recorder])
    t.fit(TaggedModule(), dm)
    loader = t.train_dataloader
    assert isinstance(loader.batch_sampler, UniformWithReplacementSampler)  # Opacus's Poisson sampler
    assert loader.batch_sampler.sample_rate == pytest.approx(0.05) and loader.dataset is dm.dataset
    sizes = [len(batch[1]) for batch in recorder.batches]
    assert len(sizes) == 20 and len(set(sizes)) > 3  # Poisson batch sizes vary around 20
    assert all(len(batch) == 3 for batch in recorder.batches)  # the user's collate_fn ran


@pytest.mark.slow
def test_adult_dict_batches_are_poisson_sampled(tmp_path, adult):
    from lightning_trust.demo import AdultDataModule, TabularMLP

    recorder = BatchRecorder()
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-5)
    t = trainer(tmp_path, max_steps=4, callbacks=[dp, recorder])
    t.fit(TabularMLP(), AdultDataModule(batch_size=256))
    assert all(set(b) >= {"x", "y", "sex", "race"} for b in recorder.batches)
    assert len({len(b["y"]) for b in recorder.batches}) > 1
    assert dp.sample_rate == pytest.approx(1 / 107)


def test_accumulate_grad_batches_is_one_noisy_step_per_logical_batch(tmp_path):
    torch.manual_seed(0)
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=0.05, target_delta=1e-3)
    t = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[dp, recorder])
    t.fit(TinyModule(hidden=5, lr=1.0), TinyData(n=240, batch_size=24))
    assert dp.sample_rate == pytest.approx(0.2)  # logical batch 2 x 24 = 48 of 240
    assert dp.steps == 2 == t.global_step and len(recorder.batches) == 4
    for step in range(2):
        (x1, y1), (x2, y2) = recorder.batches[2 * step : 2 * step + 2]
        x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
        grads = hand_update(TinyModule(hidden=5), recorder.before[2 * step], x, y, 0.05, 48.0)
        for b, a, g in zip(recorder.before[2 * step], recorder.after[2 * step + 1], grads):
            torch.testing.assert_close(a, b - g, atol=1e-6, rtol=1e-5)


def test_virtual_batches_split_logical_batches_and_step_once(tmp_path):
    torch.manual_seed(0)
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=0.05, target_delta=1e-3, max_physical_batch_size=9)
    t = trainer(tmp_path, max_epochs=1, callbacks=[dp, recorder])
    t.fit(TinyModule(hidden=5, lr=1.0), TinyData(n=240, batch_size=24))
    parts = math.ceil((24 + 3 * math.sqrt(24)) / 9)  # 5 physical batches per logical batch of ~24
    assert dp.steps == 10  # one noisy step per Poisson batch
    assert t.global_step == len(recorder.batches) == 10 * parts  # Lightning counts physical batches
    assert max(len(b[1]) for b in recorder.batches) <= 9
    for step in range(2):
        chunk = slice(step * parts, (step + 1) * parts)
        # parameters stay put until the last physical batch of the logical batch
        for after, before in zip(recorder.after[chunk][:-1], recorder.before[chunk]):
            assert all(torch.equal(a, b) for a, b in zip(after, before))
        x = torch.cat([b[0] for b in recorder.batches[chunk]])
        y = torch.cat([b[1] for b in recorder.batches[chunk]])
        grads = hand_update(TinyModule(hidden=5), recorder.before[chunk][0], x, y, 0.05, 24.0)
        for b, a, g in zip(recorder.before[chunk][0], recorder.after[chunk][-1], grads):
            torch.testing.assert_close(a, b - g, atol=1e-6, rtol=1e-5)


def test_virtual_batches_plan_noisy_steps_from_max_steps(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, max_physical_batch_size=9)
    t = trainer(tmp_path, max_steps=50, callbacks=[dp])  # 5 physical batches per logical batch
    t.fit(TinyModule(), TinyData(n=240, batch_size=24))
    assert dp.planned_steps == 10 == dp.steps and t.global_step == 50
    assert 2.0 - 0.01 <= dp.epsilon_spent <= 2.0


def test_shuffle_sampling_when_explicitly_accepted(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, poisson_sampling=False)
    t = trainer(tmp_path, max_epochs=1, callbacks=[dp])
    t.fit(TinyModule(), TinyData(n=240, batch_size=24))
    assert not isinstance(t.train_dataloader.batch_sampler, UniformWithReplacementSampler)
    report = dp.report()
    assert report["sampling"] == "shuffle" and "assuming Poisson sampling" in report["guarantee"]
    assert dp.steps == 10


def test_bf16_mixed_precision_trains(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    model = TinyModule(hidden=4)
    trainer(tmp_path, max_steps=3, precision="bf16-mixed", callbacks=[dp]).fit(model, TinyData())
    assert dp.steps == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_virtual_batches_with_ghost_clipping(tmp_path):
    torch.manual_seed(0)
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(
        noise_multiplier=0.0, max_grad_norm=0.05, target_delta=1e-3, max_physical_batch_size=9, grad_sample_mode="ghost"
    )
    t = trainer(tmp_path, max_steps=10, callbacks=[dp, recorder])
    t.fit(TinyModule(hidden=5, lr=1.0), TinyData(n=240, batch_size=24))
    assert dp.steps == 2 and t.global_step == 10  # 5 physical batches per logical batch
    x = torch.cat([b[0] for b in recorder.batches[:5]])
    y = torch.cat([b[1] for b in recorder.batches[:5]])
    grads = hand_update(TinyModule(hidden=5), recorder.before[0], x, y, 0.05, 24.0)
    for b, a, g in zip(recorder.before[0], recorder.after[4], grads):
        torch.testing.assert_close(a, b - g, atol=1e-6, rtol=1e-5)
