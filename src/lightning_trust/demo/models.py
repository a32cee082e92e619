"""Plain LightningModules that stand in for user code: they know nothing of the pack's callbacks."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

ADULT_NUM_FEATURES = 104  # one-hot width of the bundled Adult data (AdultDataModule.num_features)


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    # User-style code: each module reads its own batches, no pack helpers.
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    return batch[0], batch[1]


def check_transformer_arguments(
    sizes: dict[str, int], hidden_size: int, num_attention_heads: int, num_labels: int, lr: float, weight_decay: float
) -> None:
    """Raise ``ValueError`` for the sizes and optimizer settings a tiny demo transformer cannot be built with."""
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"The sizes must be positive integers, got {sizes}.")
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"`hidden_size` ({hidden_size}) must be a multiple of `num_attention_heads` ({num_attention_heads})."
        )
    if num_labels < 2:
        raise ValueError(f"`num_labels` must be >= 2, got {num_labels}.")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"`lr` must be positive and `weight_decay` >= 0, got {lr} and {weight_decay}.")


class ClassifierSteps:
    """The steps of a cross-entropy classifier (loss and accuracy logged through torchmetrics), shared by the
    demo modules; a module defines ``train_acc``/``val_acc``/``test_acc`` and may override how it reads a
    batch (:meth:`split_batch`) and turns inputs into logits (:meth:`logits_for`)."""

    train_acc: MulticlassAccuracy
    val_acc: MulticlassAccuracy
    test_acc: MulticlassAccuracy
    log: Any

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        return _unpack(batch)

    def logits_for(self, inputs: Tensor) -> Tensor:
        return self(inputs)  # type: ignore[operator]

    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = self.split_batch(batch)
        logits = self.logits_for(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            prog_bar=stage != "train",
            batch_size=len(y),
            sync_dist=not on_step,
        )
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x, _ = self.split_batch(batch)
        return self.logits_for(x).softmax(dim=-1)


class _Classifier(ClassifierSteps, pl.LightningModule):
    """Cross-entropy classification with accuracy logged through torchmetrics."""

    def __init__(self, num_classes: int, lr: float, optimizer: str, weight_decay: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {optimizer!r}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp: Any = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


class TabularMLP(_Classifier):
    """A multilayer perceptron for tabular data (Adult by default).

    Args:
        input_dim: number of input features (104 for the bundled Adult data).
        hidden_dims: widths of the hidden layers.
        num_classes: number of classes (logits out).
        dropout: dropout after each hidden layer.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: L2 penalty.

    Example:
        >>> model = TabularMLP(input_dim=10, hidden_dims=[16])
        >>> model(torch.zeros(3, 10)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        input_dim: int = ADULT_NUM_FEATURES,
        hidden_dims: Optional[list[int]] = None,
        num_classes: int = 2,
        dropout: float = 0.0,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
    ) -> None:
        hidden_dims = [64, 32] if hidden_dims is None else list(hidden_dims)
        super().__init__(num_classes, lr, optimizer, weight_decay)
        if input_dim < 1:
            raise ValueError(f"`input_dim` must be a positive integer, got {input_dim}.")
        if any(h < 1 for h in hidden_dims):
            raise ValueError(f"`hidden_dims` must be positive integers, got {hidden_dims}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        expected = getattr(datamodule, "num_features", None)
        if isinstance(expected, int) and expected != self.hparams["input_dim"]:
            raise ValueError(
                f"TabularMLP(input_dim={self.hparams['input_dim']}) does not match the data's {expected} features; "
                f"set `model.init_args.input_dim: {expected}`."
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SmallCNN(_Classifier):
    """A small convolutional network for small images (8x8 digits by default).

    Two 3x3 conv blocks (conv, optional BatchNorm, ReLU), max-pooling after the second, then a
    linear classifier.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        channels: output channels of the two conv blocks.
        image_size: height = width of the input images.
        batch_norm: add BatchNorm after each conv (Opacus refuses it unless ``fix_module``).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"``.
        weight_decay: L2 penalty.

    Example:
        >>> SmallCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Optional[list[int]] = None,
        image_size: int = 8,
        batch_norm: bool = False,
        lr: float = 3e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
    ) -> None:
        channels = [32, 64] if channels is None else list(channels)
        super().__init__(num_classes, lr, optimizer, weight_decay)
        if len(channels) != 2 or any(c < 1 for c in channels):
            raise ValueError(f"`channels` must be two positive integers, got {channels}.")
        if image_size < 2 or image_size % 2:
            raise ValueError(f"`image_size` must be an even integer >= 2, got {image_size}.")
        self.save_hyperparameters()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1)] + ([nn.BatchNorm2d(cout)] if batch_norm else []) + [nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, channels[0]), *block(channels[0], channels[1]), nn.MaxPool2d(2), nn.Flatten()
        )
        self.classifier = nn.Linear(channels[1] * (image_size // 2) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
