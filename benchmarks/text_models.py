"""The tiny BERT of the foundation-model benchmarks, on the bundled text demo (nothing downloaded).

A Hugging Face ``BertForSequenceClassification`` (random init from a small config) in a plain
LightningModule, as its users write it, with or without a PEFT LoRA wrap; and the raw-loop call
that a hand-written Opacus loop needs (``position_ids``/``token_type_ids`` passed at full batch
shape: Opacus alone cannot take HF's batch-broadcast ``(1, L)`` position ids).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

TEXT_BATCH = 64
VOCAB = 1024
MAX_LENGTH = 32


def tiny_bert(lora: bool = False) -> torch.nn.Module:
    """A 2-layer, 64-wide BERT classifier (about 0.2 M parameters); ``lora``: PEFT LoRA r=8 on query/value."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=MAX_LENGTH,
        num_labels=2,
        pad_token_id=0,
    )
    model = BertForSequenceClassification(config)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        lora_config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0
        )
        model = get_peft_model(model, lora_config)
    return model


class TextClassifier(pl.LightningModule):
    """A Hugging Face sequence classifier in a LightningModule (dict batches of model kwargs)."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def raw_logits(model: torch.nn.Module, batch: dict[str, Tensor], full_ids: bool) -> Tensor:
    """Logits of the HF model (or an Opacus wrap of it) on a text batch; ``full_ids``: pass
    ``position_ids``/``token_type_ids`` at ``(B, L)``, the workaround a raw Opacus loop needs."""
    ids = batch["input_ids"]
    kwargs: dict[str, Tensor] = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    if full_ids:
        kwargs["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    return model(**kwargs).logits


def text_accuracy(model: torch.nn.Module, loader: Any) -> float:
    """Accuracy of the HF model on a text loader."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = raw_logits(model, batch, full_ids=False)
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return right / total
