"""Bundled demo data and plain models: everything a demo needs, offline."""

from lightning_trust.demo.data import AdultDataModule, DictDataset, DigitsDataModule
from lightning_trust.demo.models import ADULT_NUM_FEATURES, SmallCNN, TabularMLP

__all__ = ["ADULT_NUM_FEATURES", "AdultDataModule", "DictDataset", "DigitsDataModule", "SmallCNN", "TabularMLP"]
