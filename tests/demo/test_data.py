import gzip
import hashlib
from importlib import resources

import numpy as np
import pytest
import torch

from lightning_trust.demo import ADULT_NUM_FEATURES, AdultDataModule, DigitsDataModule
from lightning_trust.demo.data import ADULT_NUMERIC, ADULT_SIDE_COLUMNS, NATIVE_REGIONS

ADULT_SHA256 = {
    "adult.data": "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
    "adult.test": "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
}


def test_bundled_adult_files_are_the_published_ones_with_licence():
    folder = resources.files("lightning_trust.demo") / "data"
    for name, digest in ADULT_SHA256.items():
        raw = gzip.decompress((folder / f"{name}.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == digest
    note = (folder / "README.md").read_text()
    assert "CC BY 4.0" in note and "UCI" in note


def test_adult_split_sizes_and_features(adult):
    assert len(adult.train_dataset) == 27146
    assert len(adult.val_dataset) == 3016
    assert len(adult.test_dataset) == 15060
    assert adult.num_features == ADULT_NUM_FEATURES == len(adult.feature_names) == 104
    assert adult.feature_names[:6] == list(ADULT_NUMERIC)
    assert "sex=Female" in adult.feature_names and "native-country=United-States" in adult.feature_names
    assert adult.categories["sex"] == ["Female", "Male"]
    assert adult.categories["native_region"] == list(NATIVE_REGIONS)
    batch = next(iter(adult.val_dataloader()))
    assert set(batch) == {"x", "y", *ADULT_SIDE_COLUMNS}
    assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.long
    for name in ADULT_SIDE_COLUMNS:
        values = adult.test_dataset.tensors[name]
        assert values.min() >= 0 and values.max() < len(adult.categories[name])
    # label balance of the published data: about a quarter earn >50K
    assert 0.22 < adult.train_dataset.tensors["y"].float().mean() < 0.27


def test_adult_statistics_come_from_train_split_only(adult):
    x_train = adult.train_dataset.tensors["x"][:, : len(ADULT_NUMERIC)]
    x_val = adult.val_dataset.tensors["x"][:, : len(ADULT_NUMERIC)]
    # standardized with train statistics: exactly mean 0 / std 1 on train, not on val/test
    assert torch.allclose(x_train.mean(0), torch.zeros(len(ADULT_NUMERIC)), atol=1e-4)
    assert torch.allclose(x_train.std(0, unbiased=False), torch.ones(len(ADULT_NUMERIC)), atol=1e-3)
    assert not torch.allclose(x_val.mean(0), torch.zeros(len(ADULT_NUMERIC)), atol=1e-4)
    # refitting on a different val split changes nothing that was learned from the val rows
    other = AdultDataModule(seed=7)
    other.setup()
    assert other.statistics != adult.statistics  # statistics follow the train rows


def test_adult_same_seed_same_batches():
    def first_batches(seed):
        dm = AdultDataModule(batch_size=32, seed=seed)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(2)], dm.val_dataset.tensors["x"]

    (a, val_a), (b, val_b), (c, val_c) = first_batches(3), first_batches(3), first_batches(4)
    for batch_a, batch_b in zip(a, b):
        for key in batch_a:
            assert torch.equal(batch_a[key], batch_b[key])
    assert torch.equal(val_a, val_b)
    assert not torch.equal(val_a, val_c)
    assert not torch.equal(a[0]["x"], c[0]["x"])


def test_adult_argument_validation():
    with pytest.raises(ValueError, match="batch_size"):
        AdultDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        AdultDataModule(val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="adult.data"):
        AdultDataModule(data_dir="/nonexistent").setup()


def test_adult_data_dir_override(tmp_path):
    folder = resources.files("lightning_trust.demo") / "data"
    for name in ("adult.data", "adult.test"):
        lines = gzip.decompress((folder / f"{name}.gz").read_bytes()).decode().splitlines(keepends=True)
        (tmp_path / name).write_text("".join(lines[:2000]))  # a plain (not gzipped) subset
    dm = AdultDataModule(data_dir=str(tmp_path))
    dm.setup()
    assert 0 < len(dm.train_dataset) + len(dm.val_dataset) < 30162


def test_digits_splits_and_shapes(digits):
    sizes = (len(digits.train_dataset), len(digits.val_dataset), len(digits.test_dataset))
    assert sum(sizes) == 1797
    assert sizes == (1167, 270, 360)
    images, _labels = next(iter(digits.train_dataloader()))
    assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(digits.test_dataset.tensors[1].tolist()) == set(range(10))
    again = DigitsDataModule(batch_size=64)
    again.setup()
    assert torch.equal(again.test_dataset.tensors[0], digits.test_dataset.tensors[0])
    train_ids = {t.numpy().tobytes() for t in digits.train_dataset.tensors[0]}
    test_ids = {t.numpy().tobytes() for t in digits.test_dataset.tensors[0]}
    # the splits are disjoint (a handful of digits images are exact duplicates in the source data)
    assert len(train_ids & test_ids) <= 5
    assert np.isclose(sizes[2] / 1797, 0.2, atol=0.01)
