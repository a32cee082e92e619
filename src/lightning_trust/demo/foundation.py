"""A tiny Hugging Face BERT as a plain LightningModule, for the Adult sentences (TinyViT: ``demo/vit.py``).

They stand in for user code built on ``transformers`` (and ``peft`` for LoRA): random init from
a small config, nothing downloaded, and they know nothing of the pack's callbacks. ``transformers``
and ``peft`` are imported when a model is built, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_trust.demo.encoder_state import VOCAB_KEY, load_encoder_state, read_state
from lightning_trust.demo.models import check_transformer_arguments
from lightning_trust.demo.text import CLS_TOKEN_ID, MASK_TOKEN_ID, PAD_TOKEN_ID, SEP_TOKEN_ID

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

__all__ = ["TASKS", "TinyTextTransformer", "load_encoder_state"]

TASKS: tuple[str, ...] = ("classification", "mlm")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's info lines and warnings (an inner Trainer's chatter)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class TinyTextTransformer(pl.LightningModule):
    """A small Hugging Face BERT (random init, no download) for masked-LM pretraining or classification.

    ``task="mlm"``: ``BertForMaskedLM``; each training step masks ``mlm_probability`` of the real
    word tokens itself (80 % ``[MASK]``, 10 % another word of the batch, 10 % kept; ``[PAD]``,
    ``[CLS]`` and ``[SEP]`` never), validation masks with a fixed seed per batch so ``val/loss`` is
    comparable across epochs; logs ``train/loss`` and ``val/loss``. ``task="classification"``:
    ``BertForSequenceClassification``; logs ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc``. Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (as
    :class:`~lightning_trust.demo.text.AdultTextDataModule` yields).

    ``pretrained`` names masked-LM weights (a Lightning ``.ckpt`` of ``task="mlm"`` or a
    ``save_pretrained`` folder) whose encoder is copied into the classifier: only the pooler and the
    classifier head start fresh. If the path does not exist and ``pretrain_if_missing``, the model
    first pretrains one (masked LM on ``AdultTextDataModule(vocab_size=vocab_size)``, CPU, quiet)
    and caches it there (``.ckpt``: a Lightning checkpoint, else a ``save_pretrained`` folder).
    With ``lora_rank > 0`` the classifier is wrapped by PEFT LoRA (query and value projections):
    only the LoRA matrices and the classifier head train, the base weights stay as they were.

    Args:
        task: ``"classification"`` or ``"mlm"``.
        vocab_size: embedding rows; the datamodule's ``vocab_size``.
        hidden_size: width of the encoder.
        num_hidden_layers: transformer layers.
        num_attention_heads: attention heads (must divide ``hidden_size``).
        intermediate_size: width of the feed-forward blocks.
        max_position_embeddings: longest sequence (>= the datamodule's ``max_length``).
        num_labels: classes of the classifier.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        mlm_probability: share of the word tokens masked per step (``task="mlm"``).
        mask_token_id: id of ``[MASK]`` (the tokenizer's).
        pad_token_id: id of ``[PAD]``, never masked and ignored by attention.
        lora_rank: LoRA rank; 0: train every weight (``task="classification"`` only).
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        pretrained: masked-LM weights to start the classifier's encoder from.
        pretrain_if_missing: pretrain and cache ``pretrained`` when it does not exist.
        pretrain_epochs: epochs of that pretraining.
        pretrain_limit_batches: training batches per pretraining epoch (``None``: all).
        pretrain_batch_size: batch size of that pretraining.
        seed: seed of the weight initialisation (and of the pretraining); the global RNG is left as it
            was. Not saved among the hparams (the datamodule's ``seed`` is; Lightning refuses two
            different values under one name).

    Example:
        >>> model = TinyTextTransformer(vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=32)
        >>> out = model(input_ids=torch.tensor([[2, 7, 9, 3, 0]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0]]))
        >>> tuple(out.logits.shape)
        (1, 2)
        >>> mlm = TinyTextTransformer(task="mlm", vocab_size=64, hidden_size=16, num_attention_heads=2)
        >>> tuple(mlm(input_ids=torch.tensor([[2, 7, 4, 3]])).logits.shape)
        (1, 4, 64)
    """

    def __init__(
        self,
        task: Literal["classification", "mlm"] = "classification",
        vocab_size: int = 1024,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 128,
        max_position_embeddings: int = 64,
        num_labels: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        mlm_probability: float = 0.15,
        mask_token_id: int = MASK_TOKEN_ID,
        pad_token_id: int = PAD_TOKEN_ID,
        lora_rank: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        pretrained: Optional[str] = None,
        pretrain_if_missing: bool = True,
        pretrain_epochs: int = 2,
        pretrain_limit_batches: Optional[int] = None,
        pretrain_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
        sizes = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
                 "num_attention_heads": num_attention_heads, "intermediate_size": intermediate_size,
                 "max_position_embeddings": max_position_embeddings}  # fmt: skip
        check_transformer_arguments(sizes, hidden_size, num_attention_heads, num_labels, lr, weight_decay)
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"`mlm_probability` must be in (0, 1), got {mlm_probability}.")
        if not (0 <= mask_token_id < vocab_size and 0 <= pad_token_id < vocab_size) or mask_token_id == pad_token_id:
            raise ValueError(
                f"`mask_token_id` ({mask_token_id}) and `pad_token_id` ({pad_token_id}) must be distinct ids below `vocab_size` ({vocab_size})."
            )
        if lora_rank < 0:
            raise ValueError(f"`lora_rank` must be >= 0, got {lora_rank}.")
        if lora_rank and task != "classification":
            raise ValueError("LoRA (`lora_rank > 0`) applies to task='classification'; pretrain the masked LM in full.")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {lora_dropout}.")
        if min(pretrain_epochs, pretrain_batch_size, pretrain_limit_batches or 1) < 1:
            raise ValueError("`pretrain_epochs`, `pretrain_batch_size` and `pretrain_limit_batches` must be positive.")
        # `seed` is kept out of the hparams: Lightning refuses a module and a datamodule hparam of the
        # same name with different values (AdultTextDataModule has its own `seed`)
        self.save_hyperparameters(ignore=["seed"])
        self.seed = seed
        from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

        self.config = BertConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
        )  # fmt: skip
        self.config.num_labels = num_labels
        with _seeded(seed):
            self.model: Any = (BertForMaskedLM if task == "mlm" else BertForSequenceClassification)(self.config)
        #: What loading ``pretrained`` did: ``{"path", "loaded", "missing", "unexpected"}`` (``None`` without it).
        self.pretrained_report: Optional[dict[str, Any]] = None
        self._pretrained_vocab: Optional[list[str]] = None
        if pretrained is not None:
            self._load_pretrained(Path(pretrained))
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                target_modules=["query", "value"], modules_to_save=["classifier"],
            )  # fmt: skip
            with _seeded(seed + 1), warnings.catch_warnings():
                # peft still calls a transformers 5 deprecated name
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
                self.model = get_peft_model(self.model, lora)
        if task == "classification":
            self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    @property
    def _hp(self) -> Any:  # the saved init arguments, read by attribute
        return self.hparams

    # pretrained encoder ---------------------------------------------------------------------
    def _load_pretrained(self, path: Path) -> None:
        hp = self._hp
        if not path.exists():
            if not hp.pretrain_if_missing:
                raise FileNotFoundError(
                    f"No pretrained encoder at {path}. Pretrain one (lightning-trust fit --config configs/text_pretrain.yaml "
                    "writes runs/text_pretrain/checkpoints/last.ckpt), or set `pretrain_if_missing: true`."
                )
            # a fresh context: a LightningCLI instantiating this module sets the hyperparameters it
            # gave in a context variable, which the pretraining module would otherwise save as its own
            contextvars.Context().run(self._pretrain, path)
        state, vocab = read_state(path)
        report = load_encoder_state(self.model, state, hp.task)
        self.pretrained_report = {"path": str(path), **report}
        self._pretrained_vocab = vocab
        new = sorted({k.rsplit(".", 1)[0] for k in report["missing"]})
        rank_zero_info(
            f"TinyTextTransformer: loaded {len(report['loaded'])} pretrained tensors from {path}"
            + (f"; newly initialised: {', '.join(new)}." if new else ".")
        )

    def _pretrain(self, path: Path) -> None:
        from lightning_trust.demo.text import AdultTextDataModule

        hp = self._hp
        arch = {k: hp[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "intermediate_size", "max_position_embeddings", "lr", "weight_decay",
                                    "mlm_probability", "mask_token_id", "pad_token_id")}  # fmt: skip
        start = time.perf_counter()
        with _seeded(self.seed), _quiet():
            mlm = TinyTextTransformer(task="mlm", seed=self.seed, **arch)
            datamodule = AdultTextDataModule(batch_size=hp.pretrain_batch_size, vocab_size=hp.vocab_size)
            trainer = pl.Trainer(
                accelerator="cpu", devices=1, max_epochs=hp.pretrain_epochs,
                limit_train_batches=hp.pretrain_limit_batches or 1.0, limit_val_batches=0, num_sanity_val_steps=0,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            )  # fmt: skip
            trainer.fit(mlm, datamodule)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial")  # renamed once complete: no half-written cache
            if path.suffix == ".ckpt":
                trainer.save_checkpoint(str(partial))
            else:
                shutil.rmtree(partial, ignore_errors=True)
                mlm.model.save_pretrained(str(partial))
                (partial / "vocab.txt").write_text("\n".join(datamodule.id_to_token) + "\n", encoding="utf-8")
            os.replace(partial, path)
        train_loss = trainer.callback_metrics.get("train/loss")
        loss = f", last-epoch MLM loss {float(train_loss):.3f}" if train_loss is not None else ""
        print(
            f"TinyTextTransformer: no pretrained encoder at {path}; pretrained one (masked LM, "
            f"{hp.pretrain_epochs} epoch{'s' if hp.pretrain_epochs > 1 else ''}, {trainer.global_step} steps{loss}) in {time.perf_counter() - start:.1f} s and cached it there."
        )

    def setup(self, stage: str) -> None:
        vocab = getattr(getattr(self.trainer, "datamodule", None), "id_to_token", None)
        if self._pretrained_vocab is not None and vocab is not None and list(vocab) != self._pretrained_vocab:
            raise ValueError(
                f"The datamodule's tokenizer differs from the one the pretrained encoder ({self._hp.pretrained}) was "
                "trained with: the same ids would mean other words. Use the pretraining's data arguments "
                "(vocab_size, include_sensitive, data_dir), or pretrain again."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        vocab = getattr(getattr(self._trainer_or_none(), "datamodule", None), "id_to_token", None)
        if vocab is not None:
            checkpoint[VOCAB_KEY] = list(vocab)  # lets a fine-tuning check that ids mean the same words

    def _trainer_or_none(self) -> Optional[pl.Trainer]:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer (a checkpoint saved by hand)
            return None

    # forward and steps ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> ModelOutput:
        """The Hugging Face model's own output: ``.logits`` (and ``.loss`` when ``labels`` are given)."""
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels
        )

    def mask_tokens(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """``(masked_ids, labels)`` for masked-LM training: labels are ``-100`` except at masked positions.

        Example:
            >>> model = TinyTextTransformer(task="mlm", vocab_size=32, hidden_size=8, num_attention_heads=2)
            >>> ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0]])
            >>> masked, labels = model.mask_tokens(ids, generator=torch.Generator().manual_seed(0))
            >>> bool((labels[0, [0, 4, 5, 6]] == -100).all()), int((labels != -100).sum()) >= 1
            (True, True)
        """
        hp = self._hp
        if attention_mask is None:
            attention_mask = (input_ids != hp.pad_token_id).long()
        eligible = attention_mask.bool() & (input_ids != hp.pad_token_id)
        eligible &= (input_ids != CLS_TOKEN_ID) & (input_ids != SEP_TOKEN_ID) & (input_ids != hp.mask_token_id)
        draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        masked = (draw < hp.mlm_probability) & eligible
        # every sentence with a word gets at least one masked word (short batches still have a loss)
        empty = ~masked.any(dim=1) & eligible.any(dim=1)
        if empty.any():
            first = torch.where(eligible, draw, torch.full_like(draw, 2.0)).argmin(dim=1)
            masked[empty.nonzero(as_tuple=True)[0], first[empty]] = True
        labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
        action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        masked_ids = torch.where(masked & (action < 0.8), torch.full_like(input_ids, hp.mask_token_id), input_ids)
        swap = masked & (action >= 0.8) & (action < 0.9)
        if swap.any():  # another real word of the batch
            pool = input_ids[eligible]
            pick = torch.randint(len(pool), (int(swap.sum()),), generator=generator, device=input_ids.device)
            masked_ids = masked_ids.masked_scatter(swap, pool[pick])
        return masked_ids, labels

    @staticmethod
    def _trimmed(batch: Mapping[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """``input_ids`` and ``attention_mask`` cut after the batch's longest sentence (padding only)."""
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        if attention_mask is not None and attention_mask.ndim == 2 and len(attention_mask):
            length = int(attention_mask.sum(dim=1).max())
            if 0 < length < input_ids.shape[1] and not attention_mask[:, length:].any():
                return input_ids[:, :length], attention_mask[:, :length]
        return input_ids, attention_mask

    def _mlm_loss(self, batch: Mapping[str, Tensor], generator: Optional[torch.Generator] = None) -> Tensor:
        input_ids, attention_mask = self._trimmed(batch)
        masked_ids, labels = self.mask_tokens(input_ids, attention_mask, generator)
        # the masked-LM head (a vocab-wide projection) only at the masked positions: the loss of
        # `self(input_ids=..., labels=...)`, at a fraction of the cost
        hidden = self.model.bert(input_ids=masked_ids, attention_mask=attention_mask).last_hidden_state
        selected = labels != -100
        return F.cross_entropy(self.model.cls(hidden[selected]), labels[selected])

    def _classify(self, batch: Mapping[str, Tensor], stage: str, metric: Optional[MulticlassAccuracy]) -> Tensor:
        labels = batch["labels"]
        input_ids, attention_mask = self._trimmed(batch)
        logits = self(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        if metric is not None:
            metric(logits, labels)
            self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        if self._hp.task == "mlm":
            loss = self._mlm_loss(batch)
            self.log(
                "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["input_ids"])
            )
            return loss
        return self._classify(batch, "train", None)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        if self._hp.task == "mlm":
            generator = torch.Generator(device=batch["input_ids"].device).manual_seed(self.seed * 100_003 + batch_idx)
            loss = self._mlm_loss(batch, generator)
            self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["input_ids"]))
            return
        self._classify(batch, "val", self.val_acc)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        if self._hp.task == "mlm":
            generator = torch.Generator(device=batch["input_ids"].device).manual_seed(self.seed * 100_003 + batch_idx)
            self.log(
                "test/loss",
                self._mlm_loss(batch, generator),
                on_step=False,
                on_epoch=True,
                batch_size=len(batch["input_ids"]),
            )
            return
        self._classify(batch, "test", self.test_acc)

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        logits = self(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return logits.softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self._hp.lr, weight_decay=self._hp.weight_decay)
