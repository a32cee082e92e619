"""A user sampler that is not uniform is refused (the accountant assumes uniform Poisson sampling)
unless Poisson sampling is switched off, which the report then flags."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler, WeightedRandomSampler

from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.privacy.outputs import REPORT_KEYS
from tests.privacy.helpers import BatchRecorder, TinyData, TinyModule, trainer


class Ordered(Sampler[list[int]]):
    """Batches of consecutive rows (e.g. length-bucketed): a user's own batch sampler."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(range(i, min(i + self.size, self.n))) for i in range(0, self.n, self.size)])

    def __len__(self) -> int:
        return (self.n + self.size - 1) // self.size


class ReversedSampler(RandomSampler):
    """A subclass of RandomSampler with its own order: not the plain sampler."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.data_source) - 1, -1, -1))


def _loader(kind: str, dataset) -> DataLoader:
    n = len(dataset)
    if kind == "weighted":
        return DataLoader(dataset, batch_size=24, sampler=WeightedRandomSampler(torch.linspace(0.1, 1.0, n), n))
    if kind == "batch_sampler":
        return DataLoader(dataset, batch_sampler=Ordered(n, 24))
    if kind == "torch_batch_sampler_of_weighted":
        return DataLoader(dataset, batch_sampler=BatchSampler(WeightedRandomSampler([1.0] * n, n), 24, False))
    if kind == "random_subset":
        return DataLoader(dataset, batch_size=24, sampler=RandomSampler(dataset, num_samples=n // 2))
    if kind == "subclass":
        return DataLoader(dataset, batch_size=24, sampler=ReversedSampler(dataset))
    if kind == "sequential":
        return DataLoader(dataset, batch_size=24, sampler=SequentialSampler(dataset))
    return DataLoader(dataset, batch_size=24, shuffle=True)


class Sampled(TinyData):
    def __init__(self, kind: str) -> None:
        super().__init__(n=240, batch_size=24)
        self.kind = kind

    def train_dataloader(self) -> DataLoader:
        return _loader(self.kind, self.dataset)


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("weighted", "sampler=WeightedRandomSampler"),
        ("batch_sampler", "batch_sampler=Ordered"),
        ("torch_batch_sampler_of_weighted", "sampler=WeightedRandomSampler"),
        ("random_subset", r"sampler=RandomSampler\(num_samples=120\)"),
        ("subclass", "sampler=ReversedSampler"),
    ],
)
def test_a_non_uniform_sampler_is_refused_before_training(tmp_path, kind, named):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    t = trainer(tmp_path, max_steps=2, callbacks=[dp])
    with pytest.raises(ValueError, match=rf"(?s)samples with {named}, not uniformly.*poisson_sampling=False"):
        t.fit(TinyModule(), Sampled(kind))
    assert t.global_step == 0 and dp.steps == 0


@pytest.mark.parametrize("kind", ["shuffle", "sequential"])
def test_uniform_samplers_are_replaced_by_poisson_sampling(tmp_path, kind):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3)
    t = trainer(tmp_path, max_steps=2, callbacks=[dp])
    t.fit(TinyModule(), Sampled(kind))
    assert isinstance(t.train_dataloader.batch_sampler, UniformWithReplacementSampler)
    assert dp.report()["unmet_assumptions"] == [] and dp.report()["sampling"] == "poisson"


def test_opting_out_of_poisson_sampling_keeps_the_sampler_and_flags_the_report(tmp_path):
    recorder = BatchRecorder()
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, poisson_sampling=False)
    t = trainer(tmp_path, max_steps=3, callbacks=[dp, recorder])
    t.fit(TinyModule(), Sampled("batch_sampler"))
    expected = TinyData(n=240).dataset.tensors[0]
    for step, (x, _) in enumerate(recorder.batches):  # the user's ordered batches, untouched
        torch.testing.assert_close(x, expected[24 * step : 24 * (step + 1)])
    assert dp.sample_rate == pytest.approx(0.1)  # q from the user's 10 batches per epoch
    report = dp.report()
    assert set(REPORT_KEYS) <= set(report)
    assert report["unmet_assumptions"] == ["poisson_sampling"] and report["sampling"] == "shuffle"
    assert "assuming Poisson sampling" in report["guarantee"] and "not proven" in report["guarantee"]
