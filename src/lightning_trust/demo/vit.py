"""A tiny Hugging Face ViT as a plain LightningModule, for the bundled digits.

It stands in for user code built on ``transformers``: random init from a small config, nothing
downloaded, and it knows nothing of the pack's callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_trust.demo.models import ClassifierSteps, check_transformer_arguments

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

__all__ = ["TinyViT"]


def _images_and_labels(batch: Any) -> tuple[Tensor, Tensor]:
    # User-style code, like the demo SmallCNN: tuples (images, labels) or dicts.
    if isinstance(batch, Mapping):
        return batch.get("pixel_values", batch.get("x")), batch.get("labels", batch.get("y"))
    return batch[0], batch[1]


class TinyViT(ClassifierSteps, pl.LightningModule):
    """A small Hugging Face ViT (random init, no download) for the bundled 8x8 digits.

    Reads ``(images, labels)`` batches (as :class:`~lightning_trust.demo.data.DigitsDataModule`
    yields; dicts with ``pixel_values``/``labels`` too) and logs what the demo ``SmallCNN`` logs:
    ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        image_size: height = width of the images (8 for digits).
        patch_size: patch side (must divide ``image_size``).
        num_channels: image channels.
        hidden_size: width of the encoder.
        num_hidden_layers: transformer layers.
        num_attention_heads: attention heads (must divide ``hidden_size``).
        intermediate_size: width of the feed-forward blocks.
        num_labels: classes.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example:
        >>> out = TinyViT()(torch.zeros(2, 1, 8, 8))
        >>> tuple(out.logits.shape)
        (2, 10)
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        num_channels: int = 1,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 128,
        num_labels: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        sizes = {"image_size": image_size, "patch_size": patch_size, "num_channels": num_channels,
                 "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
                 "num_attention_heads": num_attention_heads, "intermediate_size": intermediate_size}  # fmt: skip
        check_transformer_arguments(sizes, hidden_size, num_attention_heads, num_labels, lr, weight_decay)
        if image_size % patch_size:
            raise ValueError(f"`patch_size` ({patch_size}) must divide `image_size` ({image_size}).")
        self.save_hyperparameters()
        from transformers import ViTConfig, ViTForImageClassification

        self.config = ViTConfig(
            image_size=image_size, patch_size=patch_size, num_channels=num_channels, hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
        )  # fmt: skip
        self.config.num_labels = num_labels
        self.model: Any = ViTForImageClassification(self.config)
        self.train_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    @property
    def _hp(self) -> Any:  # the saved init arguments, read by attribute
        return self.hparams

    def forward(self, pixel_values: Tensor) -> ModelOutput:
        """The Hugging Face model's own output (``.logits`` of shape ``(B, num_labels)``)."""
        return self.model(pixel_values=pixel_values)

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        return _images_and_labels(batch)

    def logits_for(self, inputs: Tensor) -> Tensor:
        return self(inputs).logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self._hp.lr, weight_decay=self._hp.weight_decay)
