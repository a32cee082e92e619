"""One :class:`~lightning_trust.explain.Attribution` pass: Captum on the fixed sample, following the
:class:`~lightning_trust.explain.plan.Plan` (a classifier's scores, or a causal LM's generated
tokens), turned into an :class:`~lightning_trust.explain.explanation.Explanation`.

Runs inside :func:`~lightning_trust.core.isolated_eval` (DP hooks paused, eval mode, forked RNGs,
parameters frozen), so nothing of it reaches training. The other inputs (attention mask, token
types) go to every Captum forward as ``additional_forward_args``; padded positions score 0. A pass
sized in samples (``proceed``) explains a prefix of the sample: the explanation holds those samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.seam import trained_epoch
from lightning_trust.explain.explanation import Explanation, feature_names, patch_scores, to_input_space
from lightning_trust.explain.inputs import resolve_layer
from lightning_trust.explain.llm import llm_attribute, tokenizer_for
from lightning_trust.explain.methods import METHODS, attribute, chunk_slices
from lightning_trust.explain.plan import Plan
from lightning_trust.explain.plots import tokens_of, vocab_of
from lightning_trust.explain.progress import progress
from lightning_trust.explain.resolution import resolve_baselines, resolve_modality, resolve_targets
from lightning_trust.explain.sample import FixedSample

__all__ = ["compute_explanation"]


def compute_explanation(
    cb: Any,
    module: nn.Module,
    trainer: Any,
    plan: Plan,
    sample: FixedSample,
    stage: str,
    final: bool,
    sensitivity_count: Callable[[float, int], int] = lambda unit_seconds, count: count,
    proceed: Optional[Callable[[int, float], bool]] = None,
    chunk: Optional[int] = None,
) -> Explanation:
    """Explain ``sample`` with ``cb``'s settings (``final``: with the work deferred to the end;
    ``sensitivity_count(unit_seconds, configured)``: how many ``sensitivity_max`` perturbations the
    budget takes, one attribution of the sample costing ``unit_seconds``; ``proceed(done, seconds)``:
    whether to explain the chunk of ``chunk`` samples after the first ``done``, see
    :func:`~lightning_trust.explain.methods.attribute`)."""
    start = time.perf_counter()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    inputs = sample.inputs.to(device).clone()  # a normal tensor even if drawn under inference mode
    others = tuple(sample.others[name].to(device).clone() for name in plan.names)
    mask = sample.others.get("attention_mask") if plan.token else None
    modality = "text" if plan.token else resolve_modality(cb.modality, inputs)
    with isolated_eval(module, trainer, grad=True) as inner:  # forks every RNG Captum draws from
        for p in inner.parameters():
            p.requires_grad_(False)  # gradients w.r.t. inputs only: no trace in parameter grads or hooks
        torch.manual_seed(cb.seed)
        np.random.seed(cb.seed % 2**32)
        if plan.kind == "llm":
            found = _llm(cb, inner, trainer, plan, inputs, mask)
        else:
            sizing = (sensitivity_count, proceed, chunk)
            found = _model(cb, inner, trainer, plan, modality, inputs, others, mask, final, sizing)
    attributions, targets, baselines, delta, infid, sens, extra = found
    k = len(attributions)  # the samples explained: a prefix of the sample
    inputs, mask = inputs[:k], None if mask is None else mask[:k]
    if targets is not None:
        targets = targets[:k]
    if baselines is not None and len(baselines) == len(sample.inputs) and k < len(sample.inputs):
        baselines = baselines[:k]  # one per sample (a distribution of references stays whole)
    input_attr = to_input_space(attributions, inputs, modality, plan.method, mask)
    importance = input_attr.detach().abs().float().mean(dim=0).flatten().cpu()
    datamodule = getattr(trainer, "datamodule", None)
    names = feature_names(input_attr, modality, cb.feature_names, getattr(datamodule, "feature_names", None))
    tokens = None
    if modality == "text":
        rows = tokens_of(sample.inputs[:k], vocab_of(datamodule))
        keep = mask.bool().tolist() if mask is not None else [[True] * len(r) for r in rows]
        tokens = [[t for t, k in zip(row, kept) if k] for row, kept in zip(rows, keep)]
    patches = None
    if plan.patch_size and modality == "image" and input_attr.ndim == 4:
        patches = patch_scores(input_attr.detach().float().cpu(), plan.patch_size)
    return Explanation(
        stage=stage,
        epoch=trained_epoch(trainer),
        step=int(getattr(trainer, "global_step", 0) or 0),
        inputs=sample.inputs[:k].detach().cpu(),
        targets=None if targets is None else targets.detach().cpu(),
        baselines=None if baselines is None else baselines.detach().cpu(),
        attributions=attributions.detach().cpu(),
        input_attributions=input_attr.detach().cpu(),
        importance=importance,
        names=names,
        delta=None if delta is None else delta.detach().cpu(),
        infidelity=infid,
        sensitivity_max=sens,
        seconds=time.perf_counter() - start,
        mask=None if mask is None else mask.detach().cpu(),
        tokens=tokens,
        patches=patches,
        generated=extra.get("generated"),
        token_attr=extra.get("token_attr"),
        sensitivity_perturbations=int(extra.get("sensitivity_perturbations", 0)),
        samples_total=len(sample.inputs),
    )


def _model(
    cb: Any,
    module: nn.Module,
    trainer: Any,
    plan: Plan,
    modality: str,
    inputs: Tensor,
    others: tuple[Tensor, ...],
    mask: Optional[Tensor],
    final: bool,
    sizing: tuple[Callable[[float, int], int], Optional[Callable[[int, float], bool]], Optional[int]],
) -> tuple[Any, ...]:
    assert cb.sample is not None
    forward = plan.forward(module)
    targets = resolve_targets(cb.target, forward, inputs, cb.sample.targets, others)
    baselines = resolve_baselines(plan.method, cb.baseline, inputs, cb.reference, cb.blur_sigma, plan.token_id, mask)
    spec = METHODS[plan.method]
    layer = resolve_layer(module, plan.layer) if plan.layer else None
    quality = modality != "text" and not spec.layer  # Captum's metrics perturb float inputs
    with_sensitivity = quality and cb.sensitivity_samples > 0 and (final or cb.sensitivity_at == "every")
    sensitivity_count, proceed, chunk = sizing
    chunks = chunk_slices(len(inputs), chunk or cb.batch_size)
    steps = len(chunks) * (1 + (quality and cb.infidelity_samples > 0) + with_sensitivity)
    with progress(trainer, steps, f"Attribution ({cb.method})", cb.progress) as bar:
        found = attribute(
            plan.method, forward, inputs, chunks, bar.advance, layer=layer, options=cb.method_kwargs,
            baselines=baselines, targets=targets, others=others, zero_embedding=plan.zero_embedding,
            infidelity_samples=cb.infidelity_samples if quality else 0, infidelity_noise=cb.infidelity_noise,
            sensitivity_samples=cb.sensitivity_samples if with_sensitivity else 0,
            sensitivity_radius=cb.sensitivity_radius, sensitivity_count=sensitivity_count,
            proceed=proceed or (lambda done, seconds: True),
        )  # fmt: skip
    extra = {"sensitivity_perturbations": found.sensitivity_perturbations}
    return found.attributions, targets, baselines, found.delta, found.infidelity, found.sensitivity_max, extra


def _llm(cb: Any, module: nn.Module, trainer: Any, plan: Plan, ids: Tensor, mask: Optional[Tensor]) -> tuple[Any, ...]:
    from lightning_trust.explain.inputs import find_hf_model

    hf = find_hf_model(module)
    assert hf is not None  # the plan checked it
    layer = resolve_layer(module, plan.layer) if plan.layer else hf.get_input_embeddings()
    tokenizer = tokenizer_for(getattr(trainer, "datamodule", None))
    with progress(trainer, len(ids), f"Attribution ({cb.method}, causal LM)", cb.progress) as bar:
        found = llm_attribute(
            plan.method, hf, layer, ids, None if mask is None else mask.to(ids.device), tokenizer,
            plan.token_id if plan.token_id is not None else 0, cb.method_kwargs, cb.max_new_tokens, bar.advance,
        )  # fmt: skip
    attributions = torch.zeros(ids.shape, dtype=torch.float32)
    for i, seq in enumerate(found.seq_attr):
        where = mask[i].bool().cpu() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
        attributions[i, where] = seq.float()
    width = max((len(g) for g in found.generated), default=0)
    targets = torch.full((len(ids), width), -1, dtype=torch.long)
    for i, g in enumerate(found.generated):
        targets[i, : len(g)] = g
    extra = {"generated": found.generated_tokens, "token_attr": found.token_attr}
    return attributions, targets, None, None, None, None, extra
