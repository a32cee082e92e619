"""Bundled demo data and plain models: everything a demo needs, offline."""

from lightning_trust.demo.data import AdultDataModule, DictDataset, DigitsDataModule
from lightning_trust.demo.foundation import TinyTextTransformer
from lightning_trust.demo.models import ADULT_NUM_FEATURES, SmallCNN, TabularMLP
from lightning_trust.demo.text import AdultTextDataModule, WordTokenizer
from lightning_trust.demo.vit import TinyViT

__all__ = [
    "ADULT_NUM_FEATURES",
    "AdultDataModule",
    "AdultTextDataModule",
    "DictDataset",
    "DigitsDataModule",
    "SmallCNN",
    "TabularMLP",
    "TinyTextTransformer",
    "TinyViT",
    "WordTokenizer",
]
