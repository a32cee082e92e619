"""Bias mitigation during training (``FairnessPenalty``) and after it (``ThresholdOptimizer``).

``FairnessPenalty`` (in-processing) adds ``lam * penalty`` to the loss the user's
``training_step`` returns, without the user changing it: in ``setup`` the module's
``training_step`` is wrapped (an instance attribute, removed again in ``teardown``). The wrapper
records the module's own forward output on the batch through a forward hook, so no extra forward
is needed when ``training_step`` calls ``self(x)``; when it calls something else (``self.forward``
directly, a submodule) the penalty runs one extra forward of the batch with gradients (about the
cost of one more forward and backward through the model per step). Loss scaling, gradient
accumulation, AMP and logging all stay Lightning's, since the penalty is part of the returned loss.

The penalty on soft predictions ``p`` (positive-class probability; every class's probability
one-vs-rest for multiclass) over the batch's groups ``g``:

* ``demographic_parity``: ``max_g mean(p | g) - min_g mean(p | g)``;
* ``equalized_odds``: the larger of that gap among ``y = 1`` and among ``y = 0`` samples.

Groups absent from a batch are skipped (a batch with one group has no penalty). Under DDP each
rank penalises its own batch; the gradients are averaged as usual.

Not with differential privacy: the penalty couples the samples of a batch (group means), so one
record changes the gradients of the others and its influence is no longer bounded by its own
clipped per-sample gradient: DP-SGD's guarantee would silently not hold. ``FairnessPenalty``
refuses to run beside the pack's ``DifferentialPrivacy`` (or an Opacus-wrapped module); use
``ThresholdOptimizer`` there (post-processing keeps the DP guarantee of the trained model).

``ThresholdOptimizer`` (post-processing) fits ``fairlearn.postprocessing.ThresholdOptimizer`` on the
last validation epoch's scores at the end of fit (gathered over DDP ranks; a fresh pass over the
validation data when that epoch is stale), saves the per-group (randomised) thresholds in the
checkpoint, offers :class:`ThresholdPredictor` to apply them, and reports accuracy and disparities
before/after on the validation data and, when ``trainer.test`` runs, on the test data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from fairlearn.postprocessing import ThresholdOptimizer as FairlearnThresholdOptimizer
from fairlearn.postprocessing._interpolated_thresholder import InterpolatedThresholder
from fairlearn.postprocessing._threshold_operation import ThresholdOperation
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from sklearn.base import BaseEstimator
from sklearn.utils import Bunch
from torch import Tensor

from lightning_trust.core.batch import BatchContract, batch_size_of, forward_no_grad
from lightning_trust.fairness._core import (
    SUMMARIES,
    FairnessState,
    ForwardCapture,
    class_scores,
    entry_name,
    group_names,
    parse_entries,
    positive_score,
    read_codes,
    sensitive_frame,
    step_predictions,
    table,
)
from lightning_trust.core import artifact_dir, unwrap_module, write_json

Activation = Literal["auto", "softmax", "sigmoid", "none"]
Constraint = Literal[
    "demographic_parity",
    "equalized_odds",
    "true_positive_rate_parity",
    "false_positive_rate_parity",
    "true_negative_rate_parity",
    "false_negative_rate_parity",
]
Objective = Literal["accuracy_score", "balanced_accuracy_score", "selection_rate", "true_positive_rate", "true_negative_rate"]


def _single_entry(sensitive_feature: Union[str, list[str]]) -> list[str]:
    entries = parse_entries([sensitive_feature] if isinstance(sensitive_feature, str) else [list(sensitive_feature)])
    return entries[0]


def _refuse_with_dp(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> None:
    privacy = [cb for cb in trainer.callbacks if getattr(cb, "report_section", None) == "privacy"]  # type: ignore[attr-defined]
    opacus = any(type(m).__name__ == "GradSampleModule" for m in pl_module.modules()) or unwrap_module(pl_module) is not pl_module
    if privacy or opacus:
        raise RuntimeError(
            f"{who} cannot run with differential privacy ({type(privacy[0]).__name__ if privacy else 'an Opacus-wrapped module'}): "
            "the penalty couples the samples of a batch (group means), so one record's influence is not bounded by "
            "its own clipped per-sample gradient and the DP guarantee would not hold. Remove one of the two; for a fair "
            "DP model use ThresholdOptimizer (post-processing keeps the guarantee)."
        )


# in-processing --------------------------------------------------------------------------------
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
    positives = target.to(scores.dtype) if scores.shape[1] == 1 else torch.nn.functional.one_hot(target, scores.shape[1]).to(scores.dtype)
    if scores.shape[1] == 1:
        positives = positives.reshape(-1, 1)
    return torch.maximum(
        group_gap(scores, codes, num_groups, positives), group_gap(scores, codes, num_groups, 1.0 - positives)
    )


class FairnessPenalty(Callback):
    """Adds a differentiable demographic-parity / equalized-odds penalty to the training loss.

    Args:
        sensitive_feature: side column (or list of columns: their intersection) defining the groups.
        constraint: ``"demographic_parity"`` or ``"equalized_odds"``.
        lam: weight of the penalty (``loss + lam * penalty``).
        positive_label: the positive class of 2-class logits / binary targets.
        activation: how outputs become probabilities (as in :class:`FairnessMetrics`).
        warmup_epochs: epochs trained without the penalty first.
        batch_keys: batch contract overrides.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FairnessPenalty("sex", constraint="demographic_parity", lam=2.0)])
        >>> trainer.fit(TabularMLP(), AdultDataModule())  # training_step unchanged
    """

    report_section = "fairness_mitigation"

    def __init__(
        self,
        sensitive_feature: Union[str, list[str]] = "sex",
        constraint: Literal["demographic_parity", "equalized_odds"] = "demographic_parity",
        lam: float = 1.0,
        positive_label: int = 1,
        activation: Activation = "auto",
        warmup_epochs: int = 0,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
    ) -> None:
        super().__init__()
        self.columns = _single_entry(sensitive_feature)
        if constraint not in ("demographic_parity", "equalized_odds"):
            raise ValueError(f"`constraint` must be 'demographic_parity' or 'equalized_odds', got {constraint!r}.")
        if not isinstance(lam, (int, float)) or lam < 0 or not math.isfinite(lam):
            raise ValueError(f"`lam` must be a finite number >= 0, got {lam!r}.")
        if activation not in ("auto", "softmax", "sigmoid", "none"):
            raise ValueError(f"`activation` must be auto, softmax, sigmoid or none, got {activation!r}.")
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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(feature=entry_name(self.columns), constraint=self.constraint)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _refuse_with_dp(trainer, pl_module, "FairnessPenalty")
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "FairnessPenalty adds its term to the loss training_step returns, which manual optimization does not "
                "backpropagate. Add `lam * lightning_trust.fairness.mitigation.fairness_penalty(...)` to your own loss instead."
            )
        self.contract = BatchContract.resolve(self.batch_keys, trainer)
        self._sizes = [len(names) if names else None for names in (group_names(trainer, c) for c in self.columns)]
        self._patch(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("training_step", None)
            self._patched = None

    def _patch(self, pl_module: pl.LightningModule) -> None:
        if self._patched is pl_module:
            return
        original = pl_module.training_step  # the bound method of the user's class
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs["batch"]
            if pl_module.current_epoch < callback.warmup_epochs or callback.lam == 0:
                return original(*args, **kwargs)
            assert callback.contract is not None
            capture = ForwardCapture()
            capture.arm(pl_module, batch_size_of(batch, callback.contract))
            try:
                out = original(*args, **kwargs)
            finally:
                captured = capture.disarm()
            if out is None:
                return out  # the user skipped this batch
            preds = captured if captured is not None and captured.requires_grad else None
            if preds is None:
                callback.extra_forwards += 1
                preds = pl_module(callback.contract.inputs(batch))
            penalty = callback.penalty(preds, batch)
            callback._record(pl_module, penalty)
            if isinstance(out, Tensor):
                return out + callback.lam * penalty
            if isinstance(out, Mapping) and "loss" in out:
                return {**out, "loss": out["loss"] + callback.lam * penalty}
            raise TypeError(
                f"FairnessPenalty cannot add its term to a training_step output of type {type(out).__name__}; "
                "return the loss tensor or a dict with 'loss'."
            )

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._patched = pl_module

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

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_steps:
            mean = float(self._epoch_sum.item()) / self._epoch_steps  # type: ignore[union-attr]
            self.history.append({"epoch": int(trainer.current_epoch), "penalty": mean})
        self._epoch_sum, self._epoch_steps = None, 0

    def report(self) -> dict[str, Any]:
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

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "extra_forwards": self.extra_forwards, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.extra_forwards = int(state_dict.get("extra_forwards", 0))
        self.history = list(state_dict.get("history", []))


# post-processing ------------------------------------------------------------------------------
class _Scores(BaseEstimator):
    """A prefit 'estimator' whose prediction is the score column it is given (the model ran already)."""

    def fit(self, X: Any, y: Any = None, **kwargs: Any) -> _Scores:
        return self

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(X, dtype=float)[:, 0]

    def __sklearn_is_fitted__(self) -> bool:
        return True


def _to_json(interpolation: Mapping[Any, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for group, b in interpolation.items():
        entry: dict[str, Any] = {
            "p0": float(b.p0),
            "operation0": [b.operation0.operator, float(b.operation0.threshold)],
            "p1": float(b.p1),
            "operation1": [b.operation1.operator, float(b.operation1.threshold)],
        }
        if "p_ignore" in b:
            entry["p_ignore"] = float(b.p_ignore)
            entry["prediction_constant"] = float(b.prediction_constant)
        out[str(group)] = entry
    return out


def _from_json(thresholds: Mapping[str, Mapping[str, Any]]) -> dict[str, Bunch]:
    out: dict[str, Bunch] = {}
    for group, e in thresholds.items():
        fields: dict[str, Any] = {
            "p0": e["p0"],
            "operation0": ThresholdOperation(e["operation0"][0], e["operation0"][1]),
            "p1": e["p1"],
            "operation1": ThresholdOperation(e["operation1"][0], e["operation1"][1]),
        }
        if "p_ignore" in e:
            fields.update(p_ignore=e["p_ignore"], prediction_constant=e["prediction_constant"])
        out[group] = Bunch(**fields)
    return out


class ThresholdPredictor:
    """Applies fitted per-group thresholds (fairlearn's ``InterpolatedThresholder``) to a model's scores.

    Args:
        thresholds: ``{group: {p0, operation0: [op, t], p1, operation1: [op, t]}}`` as saved by
            :class:`ThresholdOptimizer` (``callback.thresholds``, or the checkpoint).
        sensitive_feature: the side column(s) the groups come from.
        group_names: ``{column: names of the integer codes}`` (``datamodule.categories``).
        positive_label, activation: as in :class:`FairnessMetrics`.
        batch_keys: batch contract overrides.

    Example:
        >>> predictor = ThresholdPredictor.from_checkpoint("last.ckpt")
        >>> labels = predictor.predict(model, batch, random_state=0)  # 0/1 per sample
    """

    def __init__(
        self,
        thresholds: Mapping[str, Mapping[str, Any]],
        sensitive_feature: Union[str, list[str]] = "sex",
        group_names: Optional[Mapping[str, Optional[list[str]]]] = None,
        positive_label: int = 1,
        activation: Activation = "auto",
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
    ) -> None:
        if not thresholds:
            raise ValueError("`thresholds` is empty: fit a ThresholdOptimizer first.")
        self.thresholds = {str(k): dict(v) for k, v in thresholds.items()}
        self.columns = _single_entry(sensitive_feature)
        self.group_names = dict(group_names or {})
        self.positive_label = positive_label
        self.activation = activation
        self.contract = BatchContract.from_keys(batch_keys)
        self.thresholder = InterpolatedThresholder(
            estimator=_Scores(), interpolation_dict=_from_json(self.thresholds), prefit=True, predict_method="predict"
        ).fit(np.zeros((1, 1)), np.zeros(1))

    @classmethod
    def from_checkpoint(cls, path: str, batch_keys: Optional[dict[str, Union[str, int]]] = None) -> ThresholdPredictor:
        """The predictor saved by a :class:`ThresholdOptimizer` in a Lightning checkpoint."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        for key, state in checkpoint.get("callbacks", {}).items():
            if str(key).startswith("ThresholdOptimizer") and state.get("thresholds"):
                return cls(
                    state["thresholds"],
                    state["sensitive_feature"],
                    state.get("group_names"),
                    state.get("positive_label", 1),
                    state.get("activation", "auto"),
                    batch_keys,
                )
        raise KeyError(f"No fitted ThresholdOptimizer state in checkpoint {path!r}.")

    def _check_groups(self, labels: np.ndarray) -> None:
        unknown = sorted(set(labels.tolist()) - set(self.thresholds))
        if unknown:
            raise ValueError(
                f"Groups {unknown} have no fitted threshold (fitted groups: {sorted(self.thresholds)}); "
                "fairlearn would silently predict 0 for them."
            )

    def positive_probability(self, scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """P(predict positive) per sample under the randomised thresholds (deterministic)."""
        self._check_groups(groups)
        return self.thresholder._pmf_predict(np.asarray(scores, dtype=float).reshape(-1, 1), sensitive_features=groups)[:, 1]

    def predict_scores(self, scores: np.ndarray, groups: np.ndarray, random_state: Optional[int] = None) -> np.ndarray:
        """0/1 predictions for positive-class ``scores`` of samples in ``groups`` (group names)."""
        self._check_groups(groups)
        return self.thresholder.predict(
            np.asarray(scores, dtype=float).reshape(-1, 1), sensitive_features=groups, random_state=random_state
        )

    def groups_of(self, batch: Any) -> np.ndarray:
        codes = read_codes(self.contract, batch, self.columns, torch.device("cpu")).numpy()
        frame = sensitive_frame(codes, self.columns, self.columns, self.group_names)
        return _labels(frame)

    def scores_of(self, module: torch.nn.Module, batch: Any) -> np.ndarray:
        preds = forward_no_grad(module, self.contract.inputs(batch))
        return positive_score(class_scores(preds, self.activation), self.positive_label).cpu().numpy()

    def predict(self, module: torch.nn.Module, batch: Any, random_state: Optional[int] = None) -> Tensor:
        """Fair 0/1 predictions of ``module`` on ``batch`` (inputs and sensitive columns from the batch)."""
        return torch.as_tensor(self.predict_scores(self.scores_of(module, batch), self.groups_of(batch), random_state))


def _labels(frame: Any) -> np.ndarray:
    """One group label per sample: the name, or ``"Female,White"`` for an intersection."""
    if hasattr(frame, "columns"):
        return np.array([",".join(map(str, row)) for row in frame.itertuples(index=False)], dtype=object)
    return np.asarray(frame, dtype=object)


def disparity_summary(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Accuracy, selection rate and the six disparity summaries (MetricFrame) of 0/1 predictions."""
    import pandas as pd

    part = table(y_true, y_pred, pd.Series(groups, name="group"), ["group"], ["accuracy", "selection_rate"])
    return {**part["overall"], **{s: part[s] for s in SUMMARIES}}


class ThresholdOptimizer(Callback):
    """Fits fairlearn's ``ThresholdOptimizer`` on validation scores at the end of fit.

    Args:
        sensitive_feature: side column (or list: intersection) defining the groups.
        constraint: fairlearn's ``constraints``: ``demographic_parity``, ``equalized_odds``,
            ``true_positive_rate_parity``, ``false_positive_rate_parity``,
            ``true_negative_rate_parity``, ``false_negative_rate_parity``.
        objective: fairlearn's ``objective`` (``accuracy_score``, ``balanced_accuracy_score``, ...).
        grid_size: fairlearn's ``grid_size``.
        positive_label, threshold, activation: the unmitigated ("before") prediction rule.
        random_state: seed of the randomised predictions in the before/after numbers.
        batch_keys: batch contract overrides.

    Example:
        >>> optimizer = ThresholdOptimizer("sex", constraint="demographic_parity")
        >>> trainer = pl.Trainer(callbacks=[optimizer]); trainer.fit(model, dm); trainer.test(model, dm)
        >>> optimizer.report()["after"]["demographic_parity_difference"]
        >>> fair_labels = optimizer.predictor().predict(model, batch, random_state=0)
    """

    report_section = "fairness_mitigation"
    CONSTRAINTS = get_args(Constraint)
    OBJECTIVES = get_args(Objective)

    def __init__(
        self,
        sensitive_feature: Union[str, list[str]] = "sex",
        constraint: Constraint = "demographic_parity",
        objective: Objective = "accuracy_score",
        grid_size: int = 1000,
        positive_label: int = 1,
        threshold: float = 0.5,
        activation: Activation = "auto",
        random_state: int = 0,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
    ) -> None:
        super().__init__()
        self.columns = _single_entry(sensitive_feature)
        if constraint not in self.CONSTRAINTS:
            raise ValueError(f"`constraint` must be one of {list(self.CONSTRAINTS)}, got {constraint!r}.")
        if objective not in self.OBJECTIVES:
            raise ValueError(f"`objective` must be one of {list(self.OBJECTIVES)}, got {objective!r}.")
        if not isinstance(grid_size, int) or grid_size < 2:
            raise ValueError(f"`grid_size` must be an integer >= 2, got {grid_size!r}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1], got {threshold}.")
        if activation not in ("auto", "softmax", "sigmoid", "none"):
            raise ValueError(f"`activation` must be auto, softmax, sigmoid or none, got {activation!r}.")
        self.constraint = constraint
        self.objective = objective
        self.grid_size = grid_size
        self.positive_label = positive_label
        self.threshold = float(threshold)
        self.activation = activation
        self.random_state = random_state
        self.batch_keys = batch_keys
        self.contract: Optional[BatchContract] = None
        self.group_names: dict[str, Optional[list[str]]] = {}
        self._state = FairnessState(keep_scores=True)
        self._capture = ForwardCapture()
        self._val: Optional[dict[str, Any]] = None  # last validation epoch's gathered arrays
        self.thresholds: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[str, dict[str, float]]] = {}  # split -> before/after
        self.fitted_on: Optional[dict[str, Any]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(feature=entry_name(self.columns), constraint=self.constraint)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.contract = BatchContract.resolve(self.batch_keys, trainer)
        self.group_names = {c: group_names(trainer, c) for c in self.columns}

    # collecting scores ------------------------------------------------------------------------
    def _collect(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        assert self.contract is not None
        preds = step_predictions(self._capture, self.contract, pl_module, batch, outputs, pl_module.trainer)
        scores = positive_score(class_scores(preds, self.activation), self.positive_label)
        y = (self.contract.target(batch).reshape(-1).to(scores.device) == self.positive_label).long()
        codes = read_codes(self.contract, batch, self.columns, scores.device)
        self._state.update(y, (scores >= self.threshold).long(), codes, scores)

    def _gathered(self, trainer: pl.Trainer) -> dict[str, Any]:
        y, _, codes, scores = self._state.compute()
        return {"y": y.cpu().numpy(), "codes": codes.cpu().numpy(), "scores": scores.cpu().numpy(), "step": int(trainer.global_step)}  # type: ignore[union-attr]

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._state.reset()
            self._state.to(pl_module.device)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._capture.arm(pl_module, batch_size_of(batch, self.contract))

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._collect(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fitted after every validation epoch, so each checkpoint carries the thresholds of its own weights
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._val = self._gathered(trainer)
            self._fit(trainer, self._val)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._state.reset()
        self._state.to(pl_module.device)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._capture.arm(pl_module, batch_size_of(batch, self.contract))

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.thresholds:
            raise RuntimeError("ThresholdOptimizer has no fitted thresholds: run trainer.fit first (or resume from its checkpoint).")
        self.results["test"] = self._before_after(self._gathered(trainer))
        self._save(trainer)

    def _fresh_validation_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise RuntimeError(
                "ThresholdOptimizer needs validation scores of the final model: run validation at the end of fit "
                "(check_val_every_n_epoch / limit_val_batches) or use a datamodule with val_dataloader()."
            )
        loader = datamodule.val_dataloader()
        self._state.reset()
        self._state.to(pl_module.device)
        for batch in loader:  # each forward is isolated (eval mode, DP paused) by step_predictions
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            self._collect(pl_module, None, batch)
        # every rank read the whole (unsharded) loader: no gather
        cat = lambda name: torch.cat(getattr(self._state, name)).cpu().numpy()  # noqa: E731
        return {"y": cat("y_true"), "codes": cat("groups"), "scores": cat("scores"), "step": int(trainer.global_step)}

    # fitting ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val is None or self._val["step"] != trainer.global_step:
            rank_zero_info("ThresholdOptimizer: the last validation epoch is not of the final model; scoring the validation data again.")
            self._fit(trainer, self._fresh_validation_pass(trainer, pl_module))
        self._save(trainer)

    def _fit(self, trainer: pl.Trainer, data: dict[str, Any]) -> None:
        self.fit_arrays(data["scores"], data["y"], self._labels(data["codes"]))
        self.fitted_on = {"samples": int(len(data["y"])), "step": int(data["step"]), "epoch": int(trainer.current_epoch)}
        self.results["validation"] = self._before_after(data)

    def fit_arrays(self, scores: np.ndarray, y_true: np.ndarray, groups: np.ndarray) -> FairlearnThresholdOptimizer:
        """Fit fairlearn's ThresholdOptimizer on positive-class scores; keeps its per-group thresholds."""
        optimizer = FairlearnThresholdOptimizer(
            estimator=_Scores(),
            constraints=self.constraint,
            objective=self.objective,
            grid_size=self.grid_size,
            prefit=True,
            predict_method="predict",
        )
        optimizer.fit(np.asarray(scores, dtype=float).reshape(-1, 1), np.asarray(y_true), sensitive_features=groups)
        self.thresholds = _to_json(optimizer.interpolated_thresholder_.interpolation_dict)
        self.fairlearn_optimizer_ = optimizer
        return optimizer

    def _labels(self, codes: np.ndarray) -> np.ndarray:
        return _labels(sensitive_frame(codes, self.columns, self.columns, self.group_names))

    def _before_after(self, data: dict[str, Any]) -> dict[str, dict[str, float]]:
        groups = self._labels(data["codes"])
        before = (data["scores"] >= self.threshold).astype(np.int64)
        after = self.predictor().predict_scores(data["scores"], groups, random_state=self.random_state)
        return {
            "before": disparity_summary(data["y"], before, groups),
            "after": disparity_summary(data["y"], after, groups),
            "samples": int(len(data["y"])),
        }

    def predictor(self) -> ThresholdPredictor:
        """A :class:`ThresholdPredictor` applying the fitted thresholds."""
        if not self.thresholds:
            raise RuntimeError("ThresholdOptimizer is not fitted yet (it fits at the end of trainer.fit).")
        return ThresholdPredictor(self.thresholds, self.columns, self.group_names, self.positive_label, self.activation, self.batch_keys)

    def _save(self, trainer: pl.Trainer) -> None:
        write_json(artifact_dir(trainer, "fairness") / f"threshold_optimizer_{entry_name(self.columns)}.json", self.report())

    # report / checkpoint ----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        latest = self.results.get("test") or self.results.get("validation") or {}
        return {
            "method": "threshold_optimizer",
            "constraint": self.constraint,
            "objective": self.objective,
            "sensitive_feature": entry_name(self.columns),
            "split": "test" if "test" in self.results else "validation",
            "before": latest.get("before"),
            "after": latest.get("after"),
            "by_split": self.results,
            "thresholds": self.thresholds,
            "fitted_on": self.fitted_on,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds,
            "sensitive_feature": list(self.columns),
            "group_names": self.group_names,
            "positive_label": self.positive_label,
            "activation": self.activation,
            "results": self.results,
            "fitted_on": self.fitted_on,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.thresholds = dict(state_dict.get("thresholds", {}))
        self.group_names = dict(state_dict.get("group_names", {})) or self.group_names
        self.results = dict(state_dict.get("results", {}))
        self.fitted_on = state_dict.get("fitted_on")
