"""What :class:`~lightning_trust.explain.AdversarialRobustness` checks at setup, before any training
step: that a pass will run at all, that the fixed sample has class targets the model can score, an
attack space for its inputs, and epsilons within that space's range. Every refusal names the fix.

Example:
    >>> check_epsilons([0.0, 0.1, 2.0], low=0.0, high=1.0, space="inputs")
    Traceback (most recent call last):
    ...
    ValueError: `epsilons` [2.0] exceed the width 1 of the inputs' range [0, 1]: an L-inf budget that large erases the input. Use epsilons in the inputs' units (e.g. 8/255 = 0.031 for images in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_trust.core.calls import PositionalInputs
from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.tensors import map_tensors
from lightning_trust.explain.robustness_inputs import (
    IGNORE_INDEX,
    AttackSample,
    attack_space,
    find_input_embeddings,
    take_rows,
    token_ids,
)

__all__ = [
    "ATTACKS", "DEFAULT_EPSILONS", "attack_start", "attacked_range", "check_arguments", "check_epsilons",
    "check_sample", "check_schedule", "check_targets", "embedding_layer",
]  # fmt: skip

ATTACKS: tuple[str, ...] = ("fgsm", "pgd")
#: Default budgets: input units, or fractions of the embedding values' width for token inputs.
DEFAULT_EPSILONS: tuple[float, ...] = (0.0, 0.1)


def check_sample(cb: Any, pl_module: nn.Module, trainer: Any) -> None:
    """Check ``cb``'s drawn sample against the model (targets, attack space, epsilons) and set what
    follows from it: the embedding layer, the attack order, the token labels' shift, token epsilons."""
    from lightning_trust.evaluation.tokens import label_shift
    from lightning_trust.explain.robustness_pass import attack_order

    cb._layer = embedding_layer(cb.sample, pl_module, cb.input_range)
    check_targets(cb.sample, pl_module, cb._layer, trainer)
    targets = cb.sample.targets
    cb.order = attack_order(targets, cb.stratify, cb.seed)
    cb._shift = label_shift("auto", cb.sample.inputs, targets) if targets.ndim == 2 else None
    if cb._shift is not None and cb.min_perturbation:
        raise ValueError(
            "`min_perturbation` searches the smallest epsilon that flips a sample's class, but the targets are "
            "per token (a language model): set `min_perturbation=False`."
        )
    space = "embeddings" if cb._layer is not None else "inputs"
    low, high = attacked_range(cb.sample, cb._layer, cb.input_range)
    if space == "embeddings" and cb._relative_epsilons:
        cb.epsilons = [float(f"{f * (high - low):.3g}") for f in DEFAULT_EPSILONS]
    check_epsilons(cb.epsilons, low, high, space=space)


def check_arguments(
    attacks: list[str], epsilons: list[float], num_samples: int, pgd_steps: int, pgd_step_size: Optional[float],
    norm: str, input_range: Optional[list[float]], min_perturbation_samples: int, batch_size: Optional[int],
) -> None:  # fmt: skip
    """Refuse a bad constructor argument, naming it and the fix (before any training)."""
    if not attacks or any(a not in ATTACKS for a in attacks) or len(set(attacks)) != len(attacks):
        raise ValueError(f"`attacks` must be distinct names among {list(ATTACKS)}, got {attacks}.")
    if not epsilons or any(e < 0 for e in epsilons):
        raise ValueError(f"`epsilons` must be a non-empty list of budgets >= 0, got {epsilons}.")
    if num_samples < 1 or pgd_steps < 1 or min_perturbation_samples < 1:
        raise ValueError("`num_samples`, `pgd_steps` and `min_perturbation_samples` must be positive integers.")
    if pgd_step_size is not None and pgd_step_size <= 0:
        raise ValueError(
            f"`pgd_step_size` must be positive (or None for 2.5 * epsilon / pgd_steps), got {pgd_step_size}."
        )
    if norm not in ("Linf", "L2"):
        raise ValueError(f"`norm` must be 'Linf' or 'L2', got {norm!r}.")
    if input_range is not None and (len(input_range) != 2 or not input_range[0] < input_range[1]):
        raise ValueError(f"`input_range` must be [low, high] with low < high, got {input_range}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size}.")


def check_schedule(stages: Sequence[str], pl_module: Any, stage: str) -> None:
    """Refuse a run in which no pass would ever happen: validation-end passes without a ``validation_step``."""
    if stage == "fit" and set(stages) <= {"validation_end"} and not is_overridden("validation_step", pl_module):
        raise ValueError(
            f"AdversarialRobustness attacks at the end of each validation epoch, but {type(pl_module).__name__} has no "
            "`validation_step`, so Lightning runs no validation: add a `validation_step`, or set `run_on: fit_end` "
            "(one attack on the validation data after training)."
        )


def embedding_layer(
    sample: AttackSample, pl_module: nn.Module, input_range: Optional[list[float]]
) -> Optional[nn.Module]:
    """The embedding layer token inputs are attacked through (``None`` for float inputs)."""
    if token_ids(sample.inputs) is None:
        return None
    layer = find_input_embeddings(pl_module)
    if layer is None:
        raise ValueError(
            f"The inputs are integer token ids, which have no gradient; AdversarialRobustness attacks them in "
            f"embedding space, but {type(pl_module).__name__} exposes no `get_input_embeddings()`: add a "
            "`get_input_embeddings()` method returning the token embedding layer (Hugging Face models have one)."
        )
    if input_range is not None:
        raise ValueError(
            "`input_range` bounds input values, but token ids are attacked in embedding space, which has no bounds: "
            "remove `input_range`."
        )
    return layer


def check_targets(sample: AttackSample, pl_module: nn.Module, layer: Optional[nn.Module], trainer: Any) -> None:
    """The targets are class indices (or token ids, -100 unlabelled) of the model's outputs."""
    targets = sample.targets
    if targets is None:
        raise ValueError(
            "AdversarialRobustness measures accuracy under attack, which needs class targets, but the validation "
            "batches have none: yield (inputs, target) tuples or dicts with a target, and set "
            "`batch_keys: {target: <key or position>}` where it is not under a default name."
        )
    if targets.is_floating_point() or targets.ndim not in (1, 2):
        raise ValueError(
            f"AdversarialRobustness needs integer class targets (N,) or token labels (N, L), got a "
            f"{targets.dtype} tensor of shape {tuple(targets.shape)}: point `batch_keys: {{target: ...}}` at the labels."
        )
    device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
    head = map_tensors(take_rows(sample.inputs, slice(0, 2)), lambda t: t.to(device))
    with isolated_eval(pl_module, trainer) as module:
        space = attack_space(module, head, layer)
        width = int(space.forward(space.start, *space.extras).shape[-1])
    labelled = targets[targets != IGNORE_INDEX] if targets.ndim == 2 else targets
    bad = sorted({int(v) for v in labelled.tolist() if not 0 <= int(v) < width})
    if bad:
        raise ValueError(
            f"Targets {bad[:5]} are not indices of the model's {width} output classes: point "
            "`batch_keys: {target: ...}` at the class labels (0..num_classes-1)."
        )


def check_epsilons(epsilons: Sequence[float], low: float, high: float, space: str) -> None:
    """Refuse L-inf budgets wider than the attacked values' range (a unit mistake, e.g. 8 for 8/255)."""
    too_big = [e for e in epsilons if e > high - low]
    if too_big:
        raise ValueError(
            f"`epsilons` {too_big} exceed the width {high - low:g} of the {space}' range [{low:g}, {high:g}]: an L-inf "
            "budget that large erases the input. Use epsilons in the "
            f"{space}' units (e.g. 8/255 = 0.031 for images in [0, 1])."
        )


def attacked_range(
    sample: AttackSample, layer: Optional[nn.Module], input_range: Optional[list[float]]
) -> tuple[float, float]:
    """The range of the attacked values: ``input_range``, else the sample's (inputs or embeddings of its real tokens)."""
    if input_range is not None:
        return float(input_range[0]), float(input_range[1])
    if layer is not None:
        ids = token_ids(sample.inputs)
        assert ids is not None
        with torch.no_grad():
            weight = layer(ids.to(next(layer.parameters()).device)).detach().float()
        return float(weight.min()), float(weight.max())
    start = attack_start(sample.inputs)
    return float(start.min()), float(start.max())


def attack_start(inputs: Any) -> Tensor:
    """The float tensor attacked in input space."""
    if isinstance(inputs, PositionalInputs):
        return inputs[0]
    if isinstance(inputs, Mapping):
        key = (
            "pixel_values"
            if "pixel_values" in inputs
            else next((k for k, v in inputs.items() if isinstance(v, Tensor) and v.is_floating_point()), None)
        )
        if key is None:
            raise ValueError(
                f"AdversarialRobustness found no float input to attack among {sorted(inputs)}: point "
                "`batch_keys: {input: <key>}` at the model's float input."
            )
        return inputs[key]
    return inputs
