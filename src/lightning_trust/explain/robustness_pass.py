"""One pass of :class:`~lightning_trust.explain.AdversarialRobustness`: Captum's attacks on the fixed
sample, chunk by chunk, sized to the overhead budget (:class:`~lightning_trust.core.sizing.PassSizer`).

The sample is attacked in :func:`attack_order`, chunk by chunk, every attack at every epsilon on a
chunk before the next: a pass cut by the budget is a prefix of that order, the same samples for every
attack and epsilon, as balanced over classes as the whole sample. The counts give each accuracy and
attack success rate with its 95% Wilson interval (:func:`~lightning_trust.core.intervals.wilson_interval`).

Example:
    >>> attack_order(torch.tensor([0, 0, 0, 1, 1, 2]), stratified=True, seed=0).tolist()  # classes in turn
    [0, 3, 5, 1, 4, 2]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_trust.core.intervals import wilson_interval
from lightning_trust.core.sizing import MIN_SAMPLES, PassSizer
from lightning_trust.explain.robustness_inputs import AttackSpace, attack_loss, correct, min_perturbation

__all__ = ["AttackCounts", "attack_order", "eps_name", "logged_metrics", "run_attacks", "suite_forwards"]


def attack_order(targets: Optional[Tensor], stratified: bool, seed: int) -> Tensor:
    """The order the sample's positions are attacked in: the classes in turn (each class in its drawn
    order) for a stratified sample of class labels, else a seeded permutation; any prefix is a fair subsample."""
    n = 0 if targets is None else len(targets)
    if targets is not None and stratified and targets.ndim == 1:
        labels = targets.tolist()
        queues = [[i for i, v in enumerate(labels) if v == c] for c in sorted(set(labels))]
        order = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
        return torch.as_tensor(order, dtype=torch.long)
    return torch.as_tensor(np.random.default_rng(seed).permutation(n), dtype=torch.long)


def eps_name(eps: float) -> str:
    """ε as written in report keys and metric names: ``0.1``, ``0``, ``0.03``."""
    return f"{float(eps):g}"


def suite_forwards(cb: Any) -> int:
    """Forward-pass equivalents a sample costs under ``cb``'s attacks (a backward counts as two): the
    clean scoring, and per non-zero epsilon FGSM's gradient and scoring, PGD's steps and scoring."""
    per_eps = {"fgsm": 3 + 1, "pgd": 3 * cb.pgd_steps + 1}
    return 1 + sum(per_eps[a] for a in cb.attacks for e in cb.epsilons if e > 0)


def logged_metrics(result: dict[str, Any]) -> dict[str, Optional[float]]:
    """A pass's numbers under their logged names (see ``ROBUSTNESS_LOGGED_KEYS``)."""
    metrics: dict[str, Optional[float]] = {
        "robustness/clean_acc": result["clean_accuracy"],
        "robustness/worst_acc": result["worst_accuracy"],
    }
    for attack, accuracies in result["robust_accuracy"].items():
        for name, value in accuracies.items():
            metrics[f"robustness/{attack}/acc@{name}"] = value
            metrics[f"robustness/{attack}/success@{name}"] = result["attack_success_rate"][attack][name]
    if result.get("min_perturbation"):
        metrics["robustness/min_perturbation"] = result["min_perturbation"]["median"]
    return metrics


@dataclass
class AttackCounts:
    """What a pass counted: correct predictions (samples, or labelled tokens) clean and under each
    attack and epsilon, clean-correct ones each attack flipped, and the samples evaluated."""

    samples: int = 0
    units: int = 0  # predictions scored: samples, or labelled tokens of a language model
    clean: int = 0
    right: dict[str, dict[str, int]] = field(default_factory=dict)
    flipped: dict[str, dict[str, int]] = field(default_factory=dict)

    def results(self, attacks: list[str], epsilons: list[float]) -> dict[str, Any]:
        """Accuracies, success rates and their Wilson intervals."""
        clean = self.clean / self.units if self.units else float("nan")
        robust = {a: {e: self.right[a][e] / self.units for e in map(eps_name, epsilons)} for a in attacks}
        success = {
            a: {e: (self.flipped[a][e] / self.clean if self.clean else None) for e in map(eps_name, epsilons)}
            for a in attacks
        }
        intervals = {
            "clean_accuracy": wilson_interval(self.clean, self.units),
            "robust_accuracy": {a: {e: wilson_interval(v, self.units) for e, v in d.items()} for a, d in self.right.items()},
            "attack_success_rate": {
                a: {e: wilson_interval(v, self.clean) for e, v in d.items()} for a, d in self.flipped.items()
            },
        }  # fmt: skip
        return {"clean_accuracy": clean, "robust_accuracy": robust, "attack_success_rate": success,
                "intervals": intervals}  # fmt: skip


def run_attacks(
    cb: Any, space: AttackSpace, y: Tensor, shift: Optional[int], order: Tensor, sizer: PassSizer, bar: Any,
    bounds: tuple[float, float],
) -> tuple[AttackCounts, Optional[dict[str, Any]]]:  # fmt: skip
    """Attack ``space``'s samples in ``order`` with ``cb``'s settings (attacks, epsilons, PGD options,
    ``batch_size``; ``shift``: token labels' shift), as many as ``sizer`` affords (all when it does not
    size, at least :data:`~lightning_trust.core.sizing.MIN_SAMPLES` when final), then the smallest
    breaking epsilon (``cb.min_perturbation``) of the clean-correct ones among them, also sized."""
    from captum.robust import FGSM, PGD

    low, high = bounds
    loss = attack_loss(shift)
    fgsm = FGSM(space.forward, loss_func=loss, lower_bound=low, upper_bound=high)
    pgd = PGD(space.forward, loss_func=loss, lower_bound=low, upper_bound=high)
    counts = AttackCounts(
        right={a: {eps_name(e): 0 for e in cb.epsilons} for a in cb.attacks},
        flipped={a: {eps_name(e): 0 for e in cb.epsilons} for a in cb.attacks},
    )
    total = len(order)
    chunk = cb.batch_size or (MIN_SAMPLES if sizer.enabled else total)
    minimum = min(MIN_SAMPLES, total)
    clean_correct = torch.zeros(total, dtype=torch.bool, device=y.device)
    done, planned, first = 0, min(chunk, total), True
    while done < planned:
        index = order[done : min(done + chunk, planned)].to(y.device)
        right = _attack_chunk(cb, space, y, shift, index, (fgsm, pgd), counts, bounds, bar)
        if shift is None:
            clean_correct[index] = right
        done += len(index)
        if first:  # the first chunk timed: the pass's size
            planned, first = sizer.count(done, total, minimum), False
            if planned < total and planned - done < done // 4:
                planned = max(done, minimum)  # a call's fixed cost would outweigh a few more samples
            chunk = cb.batch_size or max(planned - done, 1)
    counts.samples = done
    min_result = None
    if cb.min_perturbation:
        started = sizer.budget.clock()
        min_result = min_perturbation(
            space, fgsm, space.start, y, clean_correct, bar, max(cb.epsilons), cb.min_perturbation_samples,
            size=lambda searched, wanted: sizer.count(searched, wanted, 1, since=started),
        )  # fmt: skip
    return counts, min_result


def _attack_chunk(
    cb: Any, space: AttackSpace, y: Tensor, shift: Optional[int], index: Tensor, attacks: tuple[Any, Any],
    counts: AttackCounts, bounds: tuple[float, float], bar: Any,
) -> Tensor:  # fmt: skip
    """Every attack at every epsilon on the samples ``index``, counted; returns their clean correctness."""
    fgsm, pgd = attacks
    x = space.start[index].detach().clone()
    target = y[index]
    extras = tuple(e[index] for e in space.extras) or None
    mask = space.mask[index] if space.mask is not None else None

    def predict(values: Tensor) -> Tensor:
        with torch.no_grad():
            return correct(space.forward(values, *(extras or ())), target, shift)

    clean = predict(x)
    counts.units += len(clean)
    counts.clean += int(clean.sum())
    clamped = x.clamp(*bounds)
    at_zero = clean if torch.equal(clamped, x) else predict(clamped)  # no attack: the sample within the bounds
    for attack in cb.attacks:
        for eps in cb.epsilons:
            if eps == 0:
                right = at_zero
            elif attack == "fgsm":
                adv = fgsm.perturb(x.clone().requires_grad_(), epsilon=eps, target=target,
                                   additional_forward_args=extras, mask=mask)  # fmt: skip
                right = predict(adv.detach())
            else:
                step = cb.pgd_step_size if cb.pgd_step_size is not None else 2.5 * eps / cb.pgd_steps
                adv = pgd.perturb(x.clone().requires_grad_(), radius=eps, step_size=step, step_num=cb.pgd_steps,
                                  target=target, additional_forward_args=extras, random_start=cb.random_start,
                                  norm=cb.norm, mask=mask)  # fmt: skip
                right = predict(adv.detach())
            name = eps_name(eps)
            counts.right[attack][name] += int(right.sum())
            counts.flipped[attack][name] += int((clean & ~right).sum())
            bar.advance()
    return clean
