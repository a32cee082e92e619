"""What an :class:`~lightning_trust.explain.Attribution` pass explains: the inputs' modality, the
class explained for each sample (``target``) and the reference inputs (``baseline``).

Example:
    >>> import torch
    >>> resolve_modality("auto", torch.zeros(2, 1, 8, 8)), resolve_modality("auto", torch.zeros(2, 5, dtype=torch.long))
    ('image', 'text')
    >>> model = torch.nn.Linear(4, 3)
    >>> resolve_targets(2, model, torch.zeros(3, 4)).tolist()
    [2, 2, 2]
    >>> resolve_baselines("saliency", "zeros", torch.zeros(3, 4)) is None  # saliency takes no baseline
    True
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_trust.core.batch import call_module, logits_of
from lightning_trust.explain.methods import METHODS, make_baselines

__all__ = ["Modality", "resolve_baselines", "resolve_modality", "resolve_targets"]

#: How the inputs are read: ``"auto"`` (integer inputs: text, 4-D: image, else tabular) or forced.
Modality = Literal["auto", "tabular", "image", "text"]


def resolve_modality(modality: str, inputs: Tensor) -> str:
    """``modality`` unless ``"auto"``: then integer inputs are text, 4-D inputs images, the rest tabular."""
    if modality != "auto":
        return modality
    if not inputs.is_floating_point():
        return "text"
    return "image" if inputs.ndim == 4 else "tabular"


def resolve_targets(
    target: Union[str, int],
    module: Any,
    inputs: Tensor,
    sample_targets: Optional[Tensor] = None,
    others: tuple[Tensor, ...] = (),
) -> Optional[Tensor]:
    """The class explained for each input: a fixed index, the labels (``"true"``: ``sample_targets``)
    or the module's prediction (``"pred"``; ``None`` when it gives a single score per sample);
    ``others``: the module's other inputs (``module(inputs, *others)``)."""
    if isinstance(target, int):
        return torch.full((len(inputs),), target, dtype=torch.long, device=inputs.device)
    if target == "true":
        if sample_targets is None:
            raise ValueError("`target='true'` needs targets in the batches; use 'pred' or a class index.")
        return sample_targets.to(inputs.device).long()
    with torch.no_grad():
        scores = logits_of(module(inputs, *others) if others else call_module(module, inputs))
    if scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):
        return None  # a single score per sample: attribute that score
    return scores.argmax(dim=1)


def resolve_baselines(
    method: str,
    baseline: Union[str, float],
    inputs: Tensor,
    reference: Optional[Tensor] = None,
    blur_sigma: float = 1.0,
    token_id: Optional[int] = None,
    mask: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """The baselines of ``method`` for ``inputs`` (``None`` when it takes none); ``reference``: the
    training inputs the ``"mean"``/``"train"`` baselines come from. Token inputs with a ``"pad"``/
    ``"mask"`` or id baseline take ``token_id`` at every position ``mask`` keeps (padding stays padding);
    ``"zero_embedding"`` has no input-space baseline (``None``)."""
    spec = METHODS[method]
    if spec.baseline is None or baseline == "zero_embedding":
        return None
    if baseline in ("pad", "mask") and token_id is None:
        raise ValueError(f"baseline={baseline!r} needs the token's id; set `baseline` to the id number.")
    if token_id is not None and not inputs.is_floating_point():  # "pad", "mask" or an id number
        base = torch.full_like(inputs, token_id)
        return base if mask is None else torch.where(mask.to(inputs.device).bool(), base, inputs)
    reference = None if reference is None else reference.to(inputs.device).clone()
    return make_baselines(baseline, inputs, reference, blur_sigma, spec.baseline == "distribution")
