"""Bundled demo data: UCI Adult (tabular, sensitive features, regions) and scikit-learn's digits (images).

Nothing is downloaded: Adult ships in this package (``demo/data``, CC BY 4.0, see its README);
digits ship with scikit-learn.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

ADULT_COLUMNS: tuple[str, ...] = (
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
    "income",
)  # fmt: skip
ADULT_NUMERIC: tuple[str, ...] = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
ADULT_CATEGORICAL: tuple[str, ...] = (
    "workclass", "education", "marital-status", "occupation", "relationship", "race", "sex", "native-country",
)  # fmt: skip
#: Heavy-tailed columns standardized after ``log1p``.
ADULT_LOG_COLUMNS: tuple[str, ...] = ("capital-gain", "capital-loss")
AGE_GROUPS: tuple[str, ...] = ("<25", "25-44", "45-64", "65+")
NATIVE_REGIONS: tuple[str, ...] = ("United-States", "Latin-America", "Asia", "Europe", "Other")
_REGION_OF_COUNTRY: dict[str, str] = {
    "United-States": "United-States",
    **dict.fromkeys(
        ["Mexico", "Puerto-Rico", "El-Salvador", "Cuba", "Jamaica", "Dominican-Republic", "Guatemala", "Columbia",
         "Haiti", "Nicaragua", "Peru", "Ecuador", "Trinadad&Tobago", "Honduras"], "Latin-America"),
    **dict.fromkeys(
        ["Philippines", "India", "China", "South", "Japan", "Vietnam", "Taiwan", "Iran", "Cambodia", "Thailand",
         "Laos", "Hong"], "Asia"),
    **dict.fromkeys(
        ["Germany", "England", "Italy", "Poland", "Portugal", "Greece", "France", "Ireland", "Yugoslavia", "Hungary",
         "Scotland", "Holand-Netherlands"], "Europe"),
}  # fmt: skip  # everything else (Canada, Outlying-US...) is "Other"
ADULT_SIDE_COLUMNS: tuple[str, ...] = ("sex", "race", "age_group", "native_region")


def adult_split_rows(data_dir: Optional[str], seed: int, val_fraction: float) -> dict[str, list[list[str]]]:
    """The raw Adult rows (complete ones) of each split: ``train``/``val`` a seeded split of the
    original training file, ``test`` the original test file. Every Adult datamodule splits so."""
    train_rows = [r for r in _read_adult(_find_adult_file(data_dir, "adult.data")) if "?" not in r]
    test_rows = [r for r in _read_adult(_find_adult_file(data_dir, "adult.test")) if "?" not in r]
    order = np.random.default_rng(seed).permutation(len(train_rows))
    n_val = round(val_fraction * len(train_rows))
    return {
        "train": [train_rows[i] for i in order[n_val:]],
        "val": [train_rows[i] for i in order[:n_val]],
        "test": test_rows,
    }


class SplitLoaders:
    """The train/val/test/predict loaders of a datamodule holding ``train_dataset``, ``val_dataset``
    and ``test_dataset`` (built by its ``_build``), with ``batch_size``, ``num_workers`` and ``seed``:
    the training loader shuffles with a generator seeded by ``seed``; predict reads the test split."""

    batch_size: int
    num_workers: int
    seed: int
    train_dataset: Optional[Dataset]
    val_dataset: Optional[Dataset]
    test_dataset: Optional[Dataset]

    def _build(self) -> None:
        raise NotImplementedError

    def _loader(self, dataset: Optional[Dataset], shuffle: bool) -> DataLoader:
        self._build()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)


class DictDataset(Dataset):
    """A map-style dataset of equally long tensors, yielding one ``{name: tensor}`` dict per sample.

    Example:
        >>> ds = DictDataset({"x": torch.zeros(3, 2), "y": torch.arange(3)})
        >>> ds[1]["y"]
        tensor(1)
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All tensors of a DictDataset must have the same length, got {lengths}.")
        self.tensors = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Tensor]]:
        # batched indexing: one gather per column instead of one per sample
        idx = torch.as_tensor(indices, dtype=torch.long)
        columns = {name: t[idx] for name, t in self.tensors.items()}
        return [{name: c[i] for name, c in columns.items()} for i in range(len(idx))]


def _read_adult(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = []
        for line in handle:
            line = line.strip()
            if not line or line.startswith("|"):
                continue
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != len(ADULT_COLUMNS):
                raise ValueError(
                    f"{path}: expected {len(ADULT_COLUMNS)} comma-separated fields, got {len(fields)}: {line!r}"
                )
            rows.append(fields)
    return rows


def _age_group(age: float) -> int:
    return 0 if age < 25 else 1 if age < 45 else 2 if age < 65 else 3


def _find_adult_file(data_dir: Optional[Union[str, Path]], stem: str) -> Path:
    base = Path(data_dir) if data_dir is not None else Path(str(resources.files("lightning_trust.demo") / "data"))
    for name in (f"{stem}.gz", stem):
        if (base / name).exists():
            return base / name
    raise FileNotFoundError(
        f"Adult file {stem}(.gz) not found in {base}. `data_dir` must hold adult.data and adult.test "
        "(optionally gzipped), as published by UCI."
    )


class AdultDataModule(SplitLoaders, pl.LightningDataModule):
    """UCI Adult census income (>50K), bundled, with sensitive side columns.

    Rows with unknown values (``?``) are dropped: 30,162 training-file rows and 15,060 test-file
    rows remain. The training file is split into train/val (``val_fraction``, seeded); the test
    file is the test split. Numeric columns are standardized (capital gain/loss after ``log1p``)
    and categorical ones one-hot encoded, with statistics and categories from the train split
    only. Batches are dicts: ``x`` (float features), ``y`` (0/1), and the integer-coded side columns
    ``sex``, ``race``, ``age_group``, ``native_region``, whose names are in :attr:`categories`.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the validation split and of the train loader's shuffling.
        val_fraction: share of the training file held out for validation.
        data_dir: folder with ``adult.data``/``adult.test`` (gzipped or not); default: the bundled copy.

    Example:
        >>> dm = AdultDataModule(batch_size=64)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["x"].shape[1] == dm.num_features
        True
    """

    batch_keys = {"input": "x", "target": "y"}

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 42,
        val_fraction: float = 0.1,
        data_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.data_dir = data_dir
        self.feature_names: list[str] = []
        self.categories: dict[str, list[str]] = {
            "sex": [], "race": [], "age_group": list(AGE_GROUPS), "native_region": list(NATIVE_REGIONS),
        }  # fmt: skip
        self.train_dataset: Optional[DictDataset] = None
        self.val_dataset: Optional[DictDataset] = None
        self.test_dataset: Optional[DictDataset] = None
        self._prepared = False

    @property
    def num_features(self) -> int:
        """Number of input features (after one-hot encoding); 104 with the bundled data."""
        self._build()
        return len(self.feature_names)

    @property
    def num_classes(self) -> int:
        return 2

    def setup(self, stage: Optional[str] = None) -> None:
        self._build()

    def _build(self) -> None:
        if self._prepared:
            return
        split = adult_split_rows(self.data_dir, self.seed, self.val_fraction)
        fit_rows, val_rows, test_rows = split["train"], split["val"], split["test"]

        col = {name: i for i, name in enumerate(ADULT_COLUMNS)}
        # statistics and categories from the train split only
        numeric = {name: np.array([float(r[col[name]]) for r in fit_rows]) for name in ADULT_NUMERIC}
        for name in ADULT_LOG_COLUMNS:
            numeric[name] = np.log1p(numeric[name])
        stats = {name: (v.mean(), v.std() or 1.0) for name, v in numeric.items()}
        vocab = {name: sorted({r[col[name]] for r in fit_rows}) for name in ADULT_CATEGORICAL}
        self.statistics = {name: {"mean": float(m), "std": float(s)} for name, (m, s) in stats.items()}
        self.vocabulary = vocab
        self.feature_names = list(ADULT_NUMERIC) + [
            f"{name}={value}" for name in ADULT_CATEGORICAL for value in vocab[name]
        ]
        self.categories["sex"] = list(vocab["sex"])
        self.categories["race"] = list(vocab["race"])

        def encode(rows: list[list[str]]) -> DictDataset:
            features = np.zeros((len(rows), len(self.feature_names)), dtype=np.float32)
            for j, name in enumerate(ADULT_NUMERIC):
                values = np.array([float(r[col[name]]) for r in rows])
                if name in ADULT_LOG_COLUMNS:
                    values = np.log1p(values)
                mean, std = stats[name]
                features[:, j] = (values - mean) / std
            offset = len(ADULT_NUMERIC)
            for name in ADULT_CATEGORICAL:
                index = {value: k for k, value in enumerate(vocab[name])}
                for i, r in enumerate(rows):
                    k = index.get(r[col[name]])
                    if k is not None:  # a category unseen in training encodes as all zeros
                        features[i, offset + k] = 1.0
                offset += len(vocab[name])
            label = np.array([1 if r[col["income"]].rstrip(".") == ">50K" else 0 for r in rows])

            def codes(values: list[str], names: list[str]) -> Tensor:
                lookup = {v: k for k, v in enumerate(names)}
                return torch.tensor([lookup[v] for v in values], dtype=torch.long)

            return DictDataset({
                "x": torch.from_numpy(features),
                "y": torch.from_numpy(label).long(),
                "sex": codes([r[col["sex"]] for r in rows], self.categories["sex"]),
                "race": codes([r[col["race"]] for r in rows], self.categories["race"]),
                "age_group": torch.tensor([_age_group(float(r[col["age"]])) for r in rows], dtype=torch.long),
                "native_region": codes(
                    [_REGION_OF_COUNTRY.get(r[col["native-country"]], "Other") for r in rows], list(NATIVE_REGIONS)
                ),
            })  # fmt: skip

        self.train_dataset = encode(fit_rows)
        self.val_dataset = encode(val_rows)
        self.test_dataset = encode(test_rows)
        self._prepared = True


class DigitsDataModule(SplitLoaders, pl.LightningDataModule):
    """scikit-learn's bundled 8x8 handwritten digits as ``1x8x8`` float images in [0, 1], 10 classes.

    1,797 images, split with a seed into test (``test_fraction``), validation (``val_fraction``)
    and train, stratified by class. Batches are tuples ``(images, labels)``.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the splits and of the train loader's shuffling.
        val_fraction: share of all images for validation.
        test_fraction: share of all images for test.

    Example:
        >>> dm = DigitsDataModule()
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape[1:])
        (1, 8, 8)
    """

    feature_names: Optional[list[str]] = None
    class_names: list[str] = [str(d) for d in range(10)]

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 42,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"`val_fraction` and `test_fraction` must be in (0, 1) and sum below 1, got {val_fraction} and {test_fraction}."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_dataset: Optional[torch.utils.data.TensorDataset] = None
        self.val_dataset: Optional[torch.utils.data.TensorDataset] = None
        self.test_dataset: Optional[torch.utils.data.TensorDataset] = None

    num_classes = 10
    input_shape = (1, 8, 8)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        labels = digits.target.astype(np.int64)
        indices = np.arange(len(labels))
        rest, test = train_test_split(indices, test_size=self.test_fraction, random_state=self.seed, stratify=labels)
        val_share = self.val_fraction / (1 - self.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=self.seed, stratify=labels[rest])

        def subset(idx: np.ndarray) -> torch.utils.data.TensorDataset:
            idx = np.sort(idx)
            return torch.utils.data.TensorDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))

        self.train_dataset, self.val_dataset, self.test_dataset = subset(train), subset(val), subset(test)

    def _build(self) -> None:
        self.setup()
