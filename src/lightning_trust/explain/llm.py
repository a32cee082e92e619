"""Causal language models: Captum's ``LLMGradientAttribution`` / ``LLMAttribution`` of a generated
target to the prompt's tokens, and the minimal tokenizer they need over integer ids.

Each fixed sample's unpadded tokens are the prompt; the model generates ``max_new_tokens`` greedily
(Captum's own ``generate`` call) and every generated token's log-probability is attributed to the
prompt tokens: ``layer_integrated_gradients`` (or ``integrated_gradients``) over the input
embeddings through ``LLMGradientAttribution``, ``feature_ablation``/``shapley_value_sampling``
through ``LLMAttribution``. The baseline token (pad, mask or a given id) replaces absent tokens.

Captum's LLM classes take text and a Hugging Face style tokenizer. Without one, :class:`IdTokenizer`
writes each id as its vocabulary string (``id_to_token``, when the strings are unique words) or as
the number itself, and reads it back, so the prompt Captum tokenizes is exactly the sample's ids.

Example:
    >>> tok = IdTokenizer(["[PAD]", "age", "39", "bachelors"])
    >>> text = tok.decode([1, 2, 3]); text
    'age 39 bachelors'
    >>> tok.encode(text), tok(text, return_offsets_mapping=True)["offset_mapping"]
    ([1, 2, 3], [(0, 3), (4, 6), (7, 16)])
    >>> IdTokenizer().decode([7, 11])
    '7 11'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["LLM_METHODS", "IdTokenizer", "LLMResult", "llm_attribute", "tokenizer_for"]

#: methods Attribution can run on a causal LM (gradient ones through LLMGradientAttribution)
LLM_METHODS: tuple[str, ...] = (
    "integrated_gradients", "layer_integrated_gradients", "feature_ablation", "shapley_value_sampling",
)  # fmt: skip


class IdTokenizer:
    """The tokenizer interface of Captum's LLM attribution over integer ids: one whitespace-separated
    piece per id, the id's string in ``id_to_token`` when those are unique whitespace-free words,
    else the number."""

    def __init__(self, id_to_token: Optional[Sequence[str]] = None) -> None:
        words = [str(w) for w in id_to_token] if id_to_token is not None else None
        usable = words is not None and len(set(words)) == len(words) and all(w and not w.split()[1:] for w in words)
        self.words: Optional[list[str]] = words if usable and words and all(w.strip() == w for w in words) else None
        self.ids = {w: i for i, w in enumerate(self.words)} if self.words else {}

    def _piece(self, i: int) -> str:
        return self.words[i] if self.words is not None and 0 <= i < len(self.words) else str(i)

    def _id(self, piece: str) -> int:
        return self.ids[piece] if piece in self.ids else int(piece)

    def encode(
        self, text: str, add_special_tokens: bool = True, return_tensors: Optional[str] = None
    ) -> Union[list[int], Tensor]:
        ids = [self._id(p) for p in text.split()]
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids

    def decode(self, token_ids: Any) -> str:
        values = token_ids.flatten().tolist() if isinstance(token_ids, Tensor) else token_ids
        values = [values] if isinstance(values, int) else values
        return " ".join(self._piece(int(i)) for i in values)

    def convert_ids_to_tokens(self, token_ids: Union[int, list[int]]) -> Union[str, list[str]]:
        if isinstance(token_ids, int):
            return self._piece(token_ids)
        return [self._piece(int(i)) for i in token_ids]

    def convert_tokens_to_ids(self, tokens: Union[str, list[str]]) -> Union[int, list[int]]:
        if isinstance(tokens, str):
            return self._id(tokens)
        return [self._id(t) for t in tokens]

    def __call__(self, text: str, return_offsets_mapping: bool = False, **_: Any) -> dict[str, Any]:
        ids, offsets, start = [], [], 0
        for piece in text.split():
            begin = text.index(piece, start)
            start = begin + len(piece)
            ids.append(self._id(piece))
            offsets.append((begin, start))
        out: dict[str, Any] = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out


def tokenizer_for(datamodule: Any) -> Any:
    """The datamodule's Hugging Face style tokenizer when it has one, else an :class:`IdTokenizer`
    over its ``id_to_token``/``itos``/``vocab`` (or over the bare ids)."""
    given = getattr(datamodule, "tokenizer", None)
    if given is not None and all(
        callable(getattr(given, name, None)) for name in ("encode", "decode", "convert_ids_to_tokens", "__call__")
    ):
        try:
            given("a", return_offsets_mapping=True, add_special_tokens=False)
            return given
        except Exception:  # the pack's WordTokenizer and other non-HF tokenizers
            pass
    for attr in ("id_to_token", "itos"):
        table = getattr(datamodule, attr, None)
        if isinstance(table, (list, tuple)):
            return IdTokenizer(table)
    vocab = getattr(datamodule, "vocab", None)
    if isinstance(vocab, dict):
        table = [""] * (max(vocab.values()) + 1)
        for word, i in vocab.items():
            table[int(i)] = str(word)
        return IdTokenizer(table)
    return IdTokenizer()


class LLMResult(NamedTuple):
    """Per sample: the prompt's ids, ``seq_attr`` (prompt tokens), ``token_attr`` (generated x prompt
    tokens) and the generated ids and strings."""

    prompts: list[Tensor]
    seq_attr: list[Tensor]
    token_attr: list[Tensor]
    generated: list[Tensor]
    generated_tokens: list[list[str]]


def llm_attribute(
    method: str,
    model: Any,
    layer: nn.Module,
    ids: Tensor,
    mask: Optional[Tensor],
    tokenizer: Any,
    baseline_id: int,
    options: dict[str, Any],
    max_new_tokens: int,
    advance: Callable[[], None] = lambda: None,
) -> LLMResult:
    """Attribute ``max_new_tokens`` greedily generated tokens of the Hugging Face causal LM ``model``
    to each sample's unpadded prompt tokens (see the module docstring)."""
    from captum.attr import (
        FeatureAblation,
        LayerIntegratedGradients,
        LLMAttribution,
        LLMGradientAttribution,
        ShapleyValueSampling,
        TextTokenInput,
    )

    from lightning_trust.explain.methods import split_options

    init, call = split_options(method if method != "integrated_gradients" else "layer_integrated_gradients", options)
    if method in ("integrated_gradients", "layer_integrated_gradients"):
        explainer: Any = LLMGradientAttribution(LayerIntegratedGradients(model, layer, **init), tokenizer)
    else:
        base = FeatureAblation(model, **init) if method == "feature_ablation" else ShapleyValueSampling(model, **init)
        explainer = LLMAttribution(base, tokenizer)
    gen_args = {"max_new_tokens": max_new_tokens, "do_sample": False}
    out = LLMResult([], [], [], [], [])
    for i in range(len(ids)):
        prompt = ids[i][mask[i].bool()] if mask is not None else ids[i]
        inp = TextTokenInput(tokenizer.decode(prompt), tokenizer, baselines=baseline_id)
        if not torch.equal(inp.inp_tensor[0].cpu(), prompt.cpu()):
            raise ValueError(
                f"The tokenizer does not read sample {i}'s prompt back to the same ids ({prompt.tolist()} -> "
                f"{inp.inp_tensor[0].tolist()}); give the datamodule a Hugging Face tokenizer or an `id_to_token` list."
            )
        # greedy generation as Captum makes it for target=None (prompt ids only), kept to report the ids
        prompt_ids = inp.inp_tensor.to(prompt.device)
        generated = model.generate(input_ids=prompt_ids, **gen_args)[0][prompt_ids.shape[1] :]
        if isinstance(explainer, LLMGradientAttribution):
            result = explainer.attribute(inp, target=generated, **call)
        else:  # Captum's cached decoding breaks on transformers 5 (cache positions): decode without the cache
            result = explainer.attribute(inp, target=generated, use_cached_outputs=False, **call)
        out.prompts.append(prompt.cpu())
        out.seq_attr.append(result.seq_attr.detach().cpu())
        token_attr = result.token_attr if result.token_attr is not None else result.seq_attr[None]
        out.token_attr.append(token_attr.detach().cpu())
        out.generated_tokens.append(list(result.output_tokens))
        out.generated.append(generated.detach().cpu())
        advance()
    return out
