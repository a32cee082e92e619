"""Tiny foundation models for the compatibility matrix, written the way their users write them.

Every model is random-init from a small config (nothing downloaded) and knows nothing of the
pack: Hugging Face models wrapped in plain LightningModules whose ``forward`` takes the model's
keyword inputs and returns its ``ModelOutput``, a PEFT LoRA wrap of the BERT classifier, and
Lightning's own demo modules (``BoringModel`` as is, ``LightningTransformer`` on random tokens).

:func:`build` returns ``(module, datamodule)``; the datamodule is ``None`` where the module brings
its own loaders (``BoringModel``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

VOCAB = 64
SEQ_LEN = 10
PAD = 0
NUM_LABELS = 2
IMAGE = (1, 8, 8)
N_TRAIN, N_VAL = 96, 64
BATCH = 16
#: the side columns every dict batch carries (sensitive group, domain)
GROUPS, DOMAINS = 2, 3

#: the models of the matrix, in table order
MODELS: tuple[str, ...] = ("bert", "gpt2_cls", "gpt2_lm", "vit", "bert_lora", "boring", "demo_transformer")
#: models whose inputs are integer token ids
TOKEN_MODELS = frozenset({"bert", "gpt2_cls", "gpt2_lm", "bert_lora", "demo_transformer"})
#: the embedding layer of each token model (a dotted path from the LightningModule)
EMBEDDINGS: dict[str, str] = {
    "bert": "model.bert.embeddings.word_embeddings",
    "gpt2_cls": "model.transformer.wte",
    "gpt2_lm": "model.transformer.wte",
    "bert_lora": "model.base_model.model.bert.embeddings.word_embeddings",
    "demo_transformer": "model.embedding",
}


# data ---------------------------------------------------------------------------------------
class TokenDataset(Dataset):
    """Random token sentences (some padded) whose label is whether the first word is in the upper
    half of the vocabulary; ``group`` and ``domain`` are side columns (group correlates with the
    label, so fairness numbers are not trivial). ``causal``: labels are the token ids (-100 on pads)."""

    def __init__(self, n: int, seed: int, causal: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (n, SEQ_LEN), generator=g)
        lengths = torch.randint(SEQ_LEN - 4, SEQ_LEN + 1, (n,), generator=g)
        mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
        self.input_ids = ids * mask + PAD * (1 - mask)
        self.attention_mask = mask
        self.labels = (ids[:, 0] >= VOCAB // 2).long()
        flip = torch.rand(n, generator=g) < 0.3
        self.group = torch.where(flip, 1 - self.labels, self.labels)
        self.domain = torch.randint(0, DOMAINS, (n,), generator=g)
        self.causal = causal

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        labels = self.input_ids[i].masked_fill(self.attention_mask[i] == 0, -100) if self.causal else self.labels[i]
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": labels,
            "group": self.group[i],
            "domain": self.domain[i],
        }


class ImageDataset(Dataset):
    """Random 1x8x8 images in [0, 1]; the label is whether the top half is brighter than the bottom."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.rand(n, *IMAGE, generator=g)
        top, bottom = self.pixel_values[:, :, :4].mean((1, 2, 3)), self.pixel_values[:, :, 4:].mean((1, 2, 3))
        self.labels = (top > bottom).long()
        flip = torch.rand(n, generator=g) < 0.3
        self.group = torch.where(flip, 1 - self.labels, self.labels)
        self.domain = torch.randint(0, DOMAINS, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "pixel_values": self.pixel_values[i],
            "labels": self.labels[i],
            "group": self.group[i],
            "domain": self.domain[i],
        }


class ShiftedTokens(Dataset):
    """``(inputs, target)`` token tuples like WikiText2's blocks: the target is the input shifted by one."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, VOCAB, (n, SEQ_LEN + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


class DataModule(pl.LightningDataModule):
    """Train/val/test loaders over one dataset factory (a seeded shuffle for training)."""

    def __init__(self, make: Callable[[int, int], Dataset], batch_size: int = BATCH) -> None:
        super().__init__()
        self.train, self.val, self.test = make(N_TRAIN, 0), make(N_VAL, 1), make(N_VAL, 2)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.batch_size)


# modules ------------------------------------------------------------------------------------
class HFTextClassifier(pl.LightningModule):
    """A Hugging Face sequence classifier in a LightningModule, as its users write it."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(out.logits, batch["labels"])
        self.log("train_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"])
        self.log("val_loss", F.cross_entropy(out.logits, batch["labels"]), batch_size=len(batch["labels"]))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"])
        self.log("test_loss", F.cross_entropy(out.logits, batch["labels"]), batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class HFCausalLM(HFTextClassifier):
    """GPT-2 language modelling: the model computes its own shifted token-level loss from ``labels``."""

    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None
    ) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train_loss", out.loss, batch_size=len(batch["input_ids"]))
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("val_loss", out.loss, batch_size=len(batch["input_ids"]))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("test_loss", out.loss, batch_size=len(batch["input_ids"]))


class HFImageClassifier(HFTextClassifier):
    """A Hugging Face ViT classifier on ``pixel_values``."""

    def forward(self, pixel_values: Tensor) -> Any:  # type: ignore[override]
        return self.model(pixel_values=pixel_values)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["pixel_values"]).logits, batch["labels"])
        self.log("train_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = F.cross_entropy(self(batch["pixel_values"]).logits, batch["labels"])
        self.log("val_loss", loss, batch_size=len(batch["labels"]))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = F.cross_entropy(self(batch["pixel_values"]).logits, batch["labels"])
        self.log("test_loss", loss, batch_size=len(batch["labels"]))


class DemoTransformer(LightningTransformer):
    """Lightning's demo transformer as is, except ``prepare_data``, which downloads WikiText2 (the
    matrix gives it random token tuples through its own datamodule instead)."""

    def prepare_data(self) -> None:
        pass


# builders -----------------------------------------------------------------------------------
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _bert(num_labels: int = NUM_LABELS) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=16, num_labels=num_labels, pad_token_id=PAD, **_SMALL)
    return BertForSequenceClassification(config)


def _gpt2_config(**kwargs: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
        **kwargs,
    )


def _gpt2_cls() -> torch.nn.Module:
    from transformers import GPT2ForSequenceClassification

    return GPT2ForSequenceClassification(_gpt2_config(num_labels=NUM_LABELS))


def _gpt2_lm() -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(_gpt2_config())


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=IMAGE[1], patch_size=4, num_channels=IMAGE[0], num_labels=NUM_LABELS, **_SMALL)
    return ViTForImageClassification(config)


def _bert_lora() -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    return get_peft_model(_bert(), config)


def build(name: str, seed: int = 0) -> tuple[pl.LightningModule, Optional[pl.LightningDataModule]]:
    """The module and datamodule of one matrix model, seeded (the caller's RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "bert":
            return HFTextClassifier(_bert()), DataModule(TokenDataset)
        if name == "gpt2_cls":
            return HFTextClassifier(_gpt2_cls()), DataModule(TokenDataset)
        if name == "gpt2_lm":
            return HFCausalLM(_gpt2_lm()), DataModule(lambda n, s: TokenDataset(n, s, causal=True))
        if name == "vit":
            return HFImageClassifier(_vit()), DataModule(ImageDataset)
        if name == "bert_lora":
            return HFTextClassifier(_bert_lora()), DataModule(TokenDataset)
        if name == "boring":
            return BoringModel(), None
        if name == "demo_transformer":
            return DemoTransformer(vocab_size=VOCAB), DataModule(ShiftedTokens)
    raise ValueError(f"unknown model {name!r}; the matrix models are {list(MODELS)}")
