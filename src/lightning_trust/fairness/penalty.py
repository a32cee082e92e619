"""In-processing bias mitigation: ``FairnessPenalty`` adds a differentiable group-gap penalty
to the loss the user's ``training_step`` returns.

In ``setup`` the module's ``training_step`` is wrapped (an instance attribute, removed again in
``teardown``), so the user changes nothing. The wrapper keeps the module's own forward output on
the batch through a forward hook, so no extra forward is needed when ``training_step`` calls
``self(x)``; when it calls something else (``self.forward`` directly, a submodule) the penalty runs
one extra forward of the batch with gradients (about the cost of one more forward and backward
through the model per step). Loss scaling, gradient accumulation, AMP and logging all stay
Lightning's, since the penalty is part of the returned loss.

The penalty on soft predictions ``p`` (positive-class probability; every class's probability
one-vs-rest for multiclass) over the batch's groups ``g``:

* ``demographic_parity``: ``max_g mean(p | g) - min_g mean(p | g)``;
* ``equalized_odds``: the larger of that gap among ``y = 1`` and among ``y = 0`` samples.

Groups absent from a batch are skipped (a batch with one group has no penalty). Under DDP each
rank penalises its own batch; the gradients are averaged as usual.

Not with differential privacy: the penalty couples the samples of a batch (group means), so one
record changes the gradients of the others and its influence is no longer bounded by its own
clipped per-sample gradient: DP-SGD's guarantee would silently not hold. ``FairnessPenalty``
refuses every callback that declares per-sample gradients (the pack's ``DifferentialPrivacy``)
and an Opacus-wrapped module; use ``ThresholdOptimizer`` there (post-processing keeps the DP
guarantee of the trained model).

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.9], [0.7], [0.2], [0.4]])
    >>> round(group_gap(scores, torch.tensor([0, 0, 1, 1]), 2).item(), 4)
    0.5
    >>> penalty = FairnessPenalty("sex", constraint="demographic_parity", lam=2.0)
    >>> trainer = pl.Trainer(callbacks=[penalty])  # doctest: +SKIP
    >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, batch_size_of, call_module, logits_of
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.capture import ForwardCapture
from lightning_trust.core.compat import Capability
from lightning_trust.core.passes import unwrap_module
from lightning_trust.core.seam import state_key_of
from lightning_trust.fairness.checks import check_batch, check_predictions
from lightning_trust.fairness.groups import entry_name, group_names, read_codes, single_entry
from lightning_trust.fairness.predictions import Activation, check_activation, class_scores, positive_score

__all__ = ["DP_REFUSAL", "FairnessPenalty", "fairness_penalty", "group_gap"]

#: Why the penalty cannot train beside DP-SGD, and the fix.
DP_REFUSAL = (
    "the fairness penalty couples the samples of a batch (group means), so under differential privacy one "
    "record's influence is not bounded by its own clipped per-sample gradient and the DP guarantee would not hold; "
    "remove one of the two (for a fair DP model use ThresholdOptimizer: post-processing keeps the guarantee)"
)


def group_gap(scores: Tensor, codes: Tensor, num_groups: int, mask: Optional[Tensor] = None) -> Tensor:
    """Differentiable ``max_g mean - min_g mean`` of ``scores [B, K]`` over groups, per column, then max.

    ``mask [B, K]`` restricts each column to some samples (equalized odds: ``y == 1`` / ``y == 0``).
    Groups with no sample are skipped; fewer than two groups give 0. No host synchronisation.
    """
    onehot = torch.nn.functional.one_hot(codes, num_groups).to(scores.dtype)  # [B, G]
    weights = torch.ones_like(scores) if mask is None else mask.to(scores.dtype)
    counts = onehot.T @ weights  # [G, K]
    means = (onehot.T @ (scores * weights)) / counts.clamp_min(1.0)
    present = counts > 0
    high = torch.where(present, means, torch.full_like(means, -math.inf)).amax(dim=0)
    low = torch.where(present, means, torch.full_like(means, math.inf)).amin(dim=0)
    gap = torch.where(present.sum(dim=0) >= 2, high - low, torch.zeros_like(high))
    return gap.amax()


def fairness_penalty(
    scores: Tensor, codes: Tensor, num_groups: int, constraint: str, target: Optional[Tensor] = None
) -> Tensor:
    """The penalty for ``scores [B, K]`` (K = 1: positive-class probability; K = C: one-vs-rest)."""
    if constraint == "demographic_parity":
        return group_gap(scores, codes, num_groups)
    if target is None:
        raise ValueError("The equalized_odds penalty needs the batch's targets.")
    if scores.shape[1] == 1:
        positives = target.to(scores.dtype).reshape(-1, 1)
    else:
        positives = torch.nn.functional.one_hot(target, scores.shape[1]).to(scores.dtype)
    return torch.maximum(
        group_gap(scores, codes, num_groups, positives), group_gap(scores, codes, num_groups, 1.0 - positives)
    )


def _opacus_wrapped(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule is wrapped per-sample (Opacus), not merely in DDP/DataParallel."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return any(unwrap_module(m) is not m and not isinstance(m, parallel) for m in module.modules())


class FairnessPenalty(TrustCallback):
    """Adds a differentiable demographic-parity / equalized-odds penalty to the training loss.

    Args:
        sensitive_feature: side column (or list of columns: their intersection) defining the groups.
        constraint: ``"demographic_parity"`` or ``"equalized_odds"``.
        lam: weight of the penalty (``loss + lam * penalty``).
        positive_label: the positive class of 2-class logits / binary targets.
        activation: how outputs become probabilities (as in :class:`FairnessMetrics`).
        warmup_epochs: epochs trained without the penalty first.
        batch_keys: batch contract overrides.
        name: the report section (default ``fairness_mitigation``); a ``ThresholdOptimizer`` in the
            same Trainer needs another name.
    """

    report_section = "fairness_mitigation"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.ADDS_LOSS_TERM})
    refuses: ClassVar[Mapping[Capability, str]] = {Capability.PER_SAMPLE_GRADIENTS: DP_REFUSAL}
    #: What it logs (``pl_module.log`` on step and epoch).
    logged_keys: ClassVar[dict[str, str]] = {
        "fairness_penalty/value_step": "the penalty of this training batch (before `lam`)",
        "fairness_penalty/value_epoch": "the epoch's mean penalty (before `lam`)",
    }
    #: The top-level keys of :meth:`report`.
    report_keys: ClassVar[dict[str, str]] = {
        "method": "`penalty`",
        "constraint": "demographic_parity or equalized_odds",
        "lam": "the penalty's weight in the loss",
        "sensitive_feature": "the entry defining the groups",
        "steps": "training steps that added the penalty",
        "extra_forwards": "steps that ran one more forward (the step did not call the module)",
        "penalty_first_epoch": "the mean penalty of the first penalised epoch",
        "penalty_last_epoch": "the mean penalty of the last epoch",
        "history": "the mean penalty of every epoch",
    }

    def __init__(
        self,
        sensitive_feature: Union[str, list[str]] = "sex",
        constraint: Literal["demographic_parity", "equalized_odds"] = "demographic_parity",
        lam: float = 1.0,
        positive_label: int = 1,
        activation: Activation = "auto",
        warmup_epochs: int = 0,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        self.columns = single_entry(sensitive_feature)
        if constraint not in ("demographic_parity", "equalized_odds"):
            raise ValueError(f"`constraint` must be 'demographic_parity' or 'equalized_odds', got {constraint!r}.")
        if not isinstance(lam, (int, float)) or lam < 0 or not math.isfinite(lam):
            raise ValueError(f"`lam` must be a finite number >= 0, got {lam!r}.")
        check_activation(activation)
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be an integer >= 0, got {warmup_epochs!r}.")
        self.constraint = constraint
        self.lam = float(lam)
        self.positive_label = positive_label
        self.activation = activation
        self.warmup_epochs = warmup_epochs
        self.batch_keys = batch_keys
        self.contract: Optional[BatchContract] = None
        self._sizes: list[Optional[int]] = []
        self._patched: Optional[pl.LightningModule] = None
        self.steps = 0
        self.extra_forwards = 0
        self._epoch_sum: Optional[Tensor] = None
        self._epoch_steps = 0
        self.history: list[dict[str, float]] = []  # mean penalty per epoch
        self._checked = False

    @property
    def state_key(self) -> str:
        names = {"name": self.name} if self.name else {}
        return state_key_of(self, feature=entry_name(self.columns), constraint=self.constraint, **names)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # refuses DP-SGD callbacks (`refuses`)
        if stage != TrainerFn.FITTING:
            return
        if _opacus_wrapped(pl_module):
            raise RuntimeError(f"FairnessPenalty cannot train an Opacus-wrapped module: {DP_REFUSAL}.")
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "FairnessPenalty adds its term to the loss training_step returns, which manual optimization does not "
                "backpropagate. Add `lam * lightning_trust.fairness.penalty.fairness_penalty(...)` to your own loss "
                "instead."
            )
        self.contract = BatchContract.resolve(self.batch_keys, trainer, side_keys=self.columns)
        self._sizes = [len(names) if names else None for names in (group_names(trainer, c) for c in self.columns)]
        self._checked = False
        self._patch(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("training_step", None)
            self._patched = None

    def _should_skip(self, pl_module: pl.LightningModule) -> bool:
        """No penalty in the warm-up epochs, nor with ``lam == 0``."""
        return pl_module.current_epoch < self.warmup_epochs or self.lam == 0

    def _patch(self, pl_module: pl.LightningModule) -> None:
        if self._patched is pl_module:
            return
        original = pl_module.training_step  # the bound method of the user's class
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if callback._should_skip(pl_module):
                return original(*args, **kwargs)
            return callback._penalised_step(pl_module, original, args, kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._patched = pl_module

    def _penalised_step(self, pl_module: pl.LightningModule, original: Any, args: Any, kwargs: Any) -> Any:
        assert self.contract is not None
        batch = args[0] if args else kwargs["batch"]
        if not self._checked:  # the first step, before its optimizer step: columns and target
            check_batch(self.contract, batch, self.columns, self._sizes, "FairnessPenalty")
        capture = ForwardCapture(detach=False)
        capture.arm(pl_module, batch_size_of(batch, self.contract))
        try:
            out = original(*args, **kwargs)
        finally:
            captured = capture.disarm()
        if out is None:
            return out  # the user skipped this batch
        preds = captured if captured is not None and captured.requires_grad else None
        if preds is None:
            self.extra_forwards += 1
            preds = logits_of(call_module(pl_module, self.contract.inputs(batch)))
        if not self._checked:
            check_predictions(preds, self.contract.target(batch), "FairnessPenalty")
            self._checked = True
        penalty = self.penalty(preds, batch)
        self._record(pl_module, penalty)
        if isinstance(out, Tensor):
            return out + self.lam * penalty
        if isinstance(out, Mapping) and "loss" in out:
            return {**out, "loss": out["loss"] + self.lam * penalty}
        raise TypeError(
            f"FairnessPenalty cannot add its term to a training_step output of type {type(out).__name__}; "
            "return the loss tensor or a dict with 'loss'."
        )

    def penalty(self, preds: Tensor, batch: Any) -> Tensor:
        """The penalty of ``preds`` (the module's outputs on ``batch``), differentiable in ``preds``."""
        assert self.contract is not None
        scores = class_scores(preds, self.activation)
        target = self.contract.target(batch).reshape(-1).to(scores.device).long()
        if scores.ndim == 1 or scores.shape[1] == 2:
            scores = positive_score(scores, self.positive_label).reshape(-1, 1)
            target = (target == self.positive_label).long()
        codes = read_codes(self.contract, batch, self.columns, scores.device)
        combined, total = codes[:, 0], self._size(0, codes[:, 0])
        for i in range(1, codes.shape[1]):
            size = self._size(i, codes[:, i])
            combined, total = combined * size + codes[:, i], total * size
        return fairness_penalty(scores, combined, total, self.constraint, target)

    def _size(self, index: int, codes: Tensor) -> int:
        known = self._sizes[index] if index < len(self._sizes) else None
        return known if known is not None else int(codes.max().item()) + 1  # host sync only without categories

    def _record(self, pl_module: pl.LightningModule, penalty: Tensor) -> None:
        self.steps += 1
        value = penalty.detach()
        self._epoch_sum = value if self._epoch_sum is None else self._epoch_sum + value
        self._epoch_steps += 1
        pl_module.log("fairness_penalty/value", value, on_step=True, on_epoch=True, prog_bar=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_sum is not None and self._epoch_steps:
            mean = float(self._epoch_sum.item()) / self._epoch_steps
            self.history.append({"epoch": int(trainer.current_epoch), "penalty": mean})
        self._epoch_sum, self._epoch_steps = None, 0

    def report(self) -> dict[str, Any]:
        """The penalty's settings and its mean value per epoch."""
        return {
            "method": "penalty",
            "constraint": self.constraint,
            "lam": self.lam,
            "sensitive_feature": entry_name(self.columns),
            "steps": self.steps,
            "extra_forwards": self.extra_forwards,
            "penalty_first_epoch": self.history[0]["penalty"] if self.history else None,
            "penalty_last_epoch": self.history[-1]["penalty"] if self.history else None,
            "history": list(self.history),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "extra_forwards": self.extra_forwards, "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.extra_forwards = int(state_dict.get("extra_forwards", 0))
        self.history = list(state_dict.get("history", []))
