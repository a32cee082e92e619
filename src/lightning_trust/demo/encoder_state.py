"""Reading a pretrained tiny BERT's weights and vocabulary, and loading its encoder into a model.

A Lightning ``.ckpt`` of the masked-LM pretraining or a ``save_pretrained`` folder; a classifier
takes the encoder (``bert.*``), its pooler and head start fresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["VOCAB_KEY", "load_encoder_state", "read_state"]

#: Keys a classifier may lack after loading a masked-LM encoder: its pooler and head are new.
_NEW_IN_CLASSIFIER: tuple[str, ...] = ("bert.pooler.", "classifier.")
#: Keys of a masked-LM model that ``save_pretrained`` may leave out (tied to the word embeddings).
_TIED_IN_MLM: tuple[str, ...] = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
VOCAB_KEY = "tokenizer_vocab"  # checkpoint entry with the tokenizer's id -> token list


def read_state(path: Path) -> tuple[dict[str, Tensor], Optional[list[str]]]:
    """The model weights (keys as in the Hugging Face model, e.g. ``bert.encoder...``) and the
    tokenizer vocabulary (if recorded) of a Lightning ``.ckpt`` or a ``save_pretrained`` folder."""
    if path.is_dir():
        vocab_file = path / "vocab.txt"
        vocab = vocab_file.read_text(encoding="utf-8").splitlines() if vocab_file.exists() else None
        if (path / "model.safetensors").exists():
            from safetensors.torch import load_file

            return load_file(str(path / "model.safetensors")), vocab
        if (path / "pytorch_model.bin").exists():
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True), vocab
        raise FileNotFoundError(
            f"{path} is a folder without model.safetensors or pytorch_model.bin; `pretrained` must be a Lightning "
            ".ckpt of TinyTextTransformer(task='mlm') or a folder written by `save_pretrained`."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt or a save_pretrained folder."
        )
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    vocab = checkpoint.get(VOCAB_KEY)
    return state, list(vocab) if vocab is not None else None


def load_encoder_state(model: torch.nn.Module, state: Mapping[str, Tensor], task: str) -> dict[str, list[str]]:
    """Copy pretrained weights into a Hugging Face BERT; returns ``{"loaded", "missing", "unexpected"}`` key lists.

    For ``task="classification"`` only the encoder (``bert.*``) is taken: the masked-LM head is
    dropped, and only the pooler and the classifier head may be missing. For ``"mlm"`` every
    weight is taken. Anything else missing or unexpected (another architecture) raises.

    Example:
        >>> from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification
        >>> cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
        >>> mlm, clf = BertForMaskedLM(cfg), BertForSequenceClassification(cfg)
        >>> report = load_encoder_state(clf, mlm.state_dict(), "classification")
        >>> report["missing"], report["unexpected"]
        (['bert.pooler.dense.bias', 'bert.pooler.dense.weight', 'classifier.bias', 'classifier.weight'], [])
        >>> torch.equal(clf.bert.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)
        True
    """
    if task == "classification":
        source = {k: v for k, v in state.items() if k.startswith("bert.")}
        allowed_missing = _NEW_IN_CLASSIFIER
    else:
        source = dict(state)
        allowed_missing = _TIED_IN_MLM
    if not source:
        raise ValueError(
            f"The pretrained weights hold no encoder (no 'bert.*' keys; they have e.g. {sorted(state)[:3]}): "
            "pass a checkpoint of TinyTextTransformer(task='mlm') or a BERT save_pretrained folder."
        )
    try:
        result = model.load_state_dict(source, strict=False)
    except RuntimeError as error:  # shape mismatch: another vocab_size / hidden_size / ...
        raise ValueError(
            f"The pretrained encoder does not fit this model ({error}). Use the same vocab_size, hidden_size, "
            "num_hidden_layers, num_attention_heads, intermediate_size and max_position_embeddings as the pretraining."
        ) from None
    missing = sorted(result.missing_keys)
    unexpected = sorted(result.unexpected_keys)
    wrong = [k for k in missing if not k.startswith(allowed_missing)]
    if wrong or unexpected:
        raise ValueError(
            f"The pretrained encoder does not match this model: missing {wrong or 'none'}, unexpected "
            f"{unexpected or 'none'} (only {', '.join(p + '*' for p in allowed_missing)} may be missing). "
            "Use the same architecture arguments as the pretraining."
        )
    return {
        "loaded": sorted(k for k in source if k not in result.unexpected_keys),
        "missing": missing,
        "unexpected": unexpected,
    }
