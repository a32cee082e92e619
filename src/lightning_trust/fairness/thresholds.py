"""Post-processing bias mitigation: ``ThresholdOptimizer`` fits fairlearn's
``ThresholdOptimizer`` on validation scores; :class:`~lightning_trust.fairness.predictor.ThresholdPredictor`
(in :mod:`~lightning_trust.fairness.predictor`) applies the fitted thresholds.

The optimizer is fitted on the last validation epoch's scores (gathered over DDP ranks) after
every validation epoch of fit, so each checkpoint carries the thresholds of its own weights; at
the end of fit it scores the validation data again when that epoch is stale. It reports accuracy
and disparities before/after on the validation data and, when ``trainer.test`` runs, on the test
data.

Example:
    >>> import numpy as np
    >>> optimizer = ThresholdOptimizer("sex", constraint="demographic_parity", grid_size=20)
    >>> scores, y = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1]), np.array([1, 1, 0, 1, 0, 0])
    >>> groups = np.array(["F", "F", "F", "M", "M", "M"], dtype=object)
    >>> _ = optimizer.fit_arrays(scores, y, groups)
    >>> sorted(optimizer.thresholds)
    ['F', 'M']
    >>> optimizer.predictor().positive_probability(scores, groups).shape
    (6,)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union, get_args

import lightning.pytorch as pl
import numpy as np
from fairlearn.postprocessing import ThresholdOptimizer as FairlearnThresholdOptimizer
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DistributedSampler
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, batch_size_of
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.capture import ForwardCapture, step_predictions
from lightning_trust.core.compat import Capability
from lightning_trust.core.loaders import split_loaders
from lightning_trust.core.output import artifact_dir, write_json
from lightning_trust.core.seam import state_key_of
from lightning_trust.fairness.checks import check_batch, check_predictions, predictions_of, probe_batch
from lightning_trust.fairness.groups import (
    entry_name,
    group_labels,
    group_names,
    read_codes,
    sensitive_frame,
    single_entry,
)
from lightning_trust.fairness.predictions import Activation, check_activation, class_scores, positive_score
from lightning_trust.fairness.predictor import (
    PrefitScores,
    ThresholdPredictor,
    thresholds_from_json,
    thresholds_to_json,
)
from lightning_trust.fairness.state import FairnessState
from lightning_trust.fairness.tables import disparity_summary

__all__ = ["PrefitScores", "ThresholdOptimizer", "ThresholdPredictor", "thresholds_from_json", "thresholds_to_json"]

Constraint = Literal[
    "demographic_parity",
    "equalized_odds",
    "true_positive_rate_parity",
    "false_positive_rate_parity",
    "true_negative_rate_parity",
    "false_negative_rate_parity",
]
Objective = Literal[
    "accuracy_score", "balanced_accuracy_score", "selection_rate", "true_positive_rate", "true_negative_rate"
]


class ThresholdOptimizer(TrustCallback):
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
        name: the report section (default ``fairness_mitigation``); a ``FairnessPenalty`` in the
            same Trainer needs another name.

    Example:
        >>> optimizer = ThresholdOptimizer("sex", constraint="demographic_parity")
        >>> trainer = pl.Trainer(callbacks=[optimizer]); trainer.fit(model, dm)  # doctest: +SKIP
        >>> optimizer.report()["after"]["demographic_parity_difference"]  # doctest: +SKIP
        >>> fair_labels = optimizer.predictor().predict(model, batch, random_state=0)  # doctest: +SKIP
    """

    report_section = "fairness_mitigation"
    # scores the validation data again at the end of fit when the last validation epoch is stale
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EXTRA_PASSES})
    CONSTRAINTS = get_args(Constraint)
    OBJECTIVES = get_args(Objective)
    #: It logs nothing; its numbers are in :meth:`report` and a JSON file.
    logged_keys: ClassVar[dict[str, str]] = {}
    #: The top-level keys of :meth:`report`.
    report_keys: ClassVar[dict[str, str]] = {
        "method": "`threshold_optimizer`",
        "constraint": "fairlearn's constraint",
        "objective": "fairlearn's objective",
        "sensitive_feature": "the entry defining the groups",
        "split": "the split of `before`/`after`: test when it ran, else validation",
        "before": "accuracy, selection rate and disparities at the plain threshold",
        "after": "the same under the fitted per-group thresholds",
        "by_split": "split -> before, after, samples",
        "thresholds": "group -> fairlearn's randomised thresholds",
        "fitted_on": "samples, step and epoch of the fit",
    }

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
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        self.columns = single_entry(sensitive_feature)
        if constraint not in self.CONSTRAINTS:
            raise ValueError(f"`constraint` must be one of {list(self.CONSTRAINTS)}, got {constraint!r}.")
        if objective not in self.OBJECTIVES:
            raise ValueError(f"`objective` must be one of {list(self.OBJECTIVES)}, got {objective!r}.")
        if not isinstance(grid_size, int) or grid_size < 2:
            raise ValueError(f"`grid_size` must be an integer >= 2, got {grid_size!r}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1], got {threshold}.")
        check_activation(activation)
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
        self.results: dict[str, dict[str, Any]] = {}  # split -> before/after
        self.fitted_on: Optional[dict[str, Any]] = None
        self._checked = False

    @property
    def state_key(self) -> str:
        names = {"name": self.name} if self.name else {}
        return state_key_of(self, feature=entry_name(self.columns), constraint=self.constraint, **names)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.contract = BatchContract.resolve(self.batch_keys, trainer, side_keys=self.columns)
        self.group_names = {c: group_names(trainer, c) for c in self.columns}
        self._checked = False

    def _check(self, batch: Any, preds: Optional[Any] = None) -> None:
        """Refuse missing or non-integer sensitive columns, a missing target, per-token predictions."""
        assert self.contract is not None
        capacities = [len(n) if n else None for n in (self.group_names[c] for c in self.columns)]
        check_batch(self.contract, batch, self.columns, capacities, "ThresholdOptimizer")
        if preds is not None:
            check_predictions(preds, self.contract.target(batch), "ThresholdOptimizer")
            self._checked = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the first optimizer step: one validation batch, as the sanity pass would show it
        batch = probe_batch(trainer, pl_module) if not self._checked else None
        if batch is not None and self.contract is not None:
            self._check(batch)
            self._check(batch, predictions_of(trainer, pl_module, self.contract, batch))

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """Scores are collected in fit's validation epochs (not the sanity check) and in test."""
        if trainer.state.stage == RunningStage.VALIDATING:
            return trainer.state.fn != TrainerFn.FITTING
        return trainer.state.stage != RunningStage.TESTING

    # collecting scores ------------------------------------------------------------------------
    def _start(self, pl_module: pl.LightningModule) -> None:
        self._state.reset()
        self._state.to(pl_module.device)

    def _arm(self, pl_module: pl.LightningModule, batch: Any) -> None:
        self._capture.arm(pl_module, batch_size_of(batch, self.contract))

    def _collect(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        assert self.contract is not None
        preds = step_predictions(self._capture, self.contract, pl_module, batch, outputs, pl_module.trainer)
        if not self._checked:
            self._check(batch, preds)
        scores = positive_score(class_scores(preds, self.activation), self.positive_label)
        y = (self.contract.target(batch).reshape(-1).to(scores.device) == self.positive_label).long()
        codes = read_codes(self.contract, batch, self.columns, scores.device)
        self._state.update(y, (scores >= self.threshold).long(), codes, scores)

    def _arrays(self, trainer: pl.Trainer, gather: bool = True) -> dict[str, Any]:
        y, _, codes, scores = self._state.compute() if gather else self._state.local()
        assert scores is not None  # keep_scores=True
        return {
            "y": y.cpu().numpy(),
            "codes": codes.cpu().numpy(),
            "scores": scores.cpu().numpy(),
            "step": int(trainer.global_step),
        }

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self._start(pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._should_skip(trainer):
            self._arm(pl_module, batch)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._should_skip(trainer):
            self._collect(pl_module, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fitted after every validation epoch, so each checkpoint carries the thresholds of its own weights
        if not self._should_skip(trainer):
            self._val = self._arrays(trainer)
            self._fit(trainer, self._val)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self._start(pl_module)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._should_skip(trainer):
            self._arm(pl_module, batch)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._should_skip(trainer):
            self._collect(pl_module, outputs, batch)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        if not self.thresholds:
            raise RuntimeError(
                "ThresholdOptimizer has no fitted thresholds: run trainer.fit first (or resume from its checkpoint)."
            )
        self.results["test"] = self._before_after(self._arrays(trainer))
        self._save(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val is None or self._val["step"] != trainer.global_step:
            rank_zero_info(
                "ThresholdOptimizer: the last validation epoch is not of the final model; scoring the validation "
                "data again."
            )
            self._fit(trainer, self._fresh_validation_pass(trainer, pl_module))
        self._save(trainer)

    def _fresh_validation_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        loaders = split_loaders(trainer, "val")
        if not loaders:
            raise RuntimeError(
                "ThresholdOptimizer needs validation scores of the final model: run validation at the end of fit "
                "(check_val_every_n_epoch / limit_val_batches) or use a datamodule with val_dataloader()."
            )
        self._start(pl_module)
        for loader in loaders:
            for batch in loader:  # each forward is isolated (eval mode, DP paused) by step_predictions
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                self._collect(pl_module, None, batch)
        # loaders sharded by a DistributedSampler are gathered; an unsharded loader was read whole on every rank
        sharded = trainer.world_size > 1 and any(isinstance(lo.sampler, DistributedSampler) for lo in loaders)
        return self._arrays(trainer, gather=sharded)

    # fitting ----------------------------------------------------------------------------------
    def _fit(self, trainer: pl.Trainer, data: dict[str, Any]) -> None:
        self.fit_arrays(data["scores"], data["y"], self._labels(data["codes"]))
        self.fitted_on = {"samples": len(data["y"]), "step": int(data["step"]), "epoch": int(trainer.current_epoch)}
        self.results["validation"] = self._before_after(data)

    def fit_arrays(self, scores: np.ndarray, y_true: np.ndarray, groups: np.ndarray) -> FairlearnThresholdOptimizer:
        """Fit fairlearn's ThresholdOptimizer on positive-class scores; keeps its per-group thresholds."""
        optimizer = FairlearnThresholdOptimizer(
            estimator=PrefitScores(),
            constraints=self.constraint,
            objective=self.objective,
            grid_size=self.grid_size,
            prefit=True,
            predict_method="predict",
        )
        optimizer.fit(np.asarray(scores, dtype=float).reshape(-1, 1), np.asarray(y_true), sensitive_features=groups)
        self.thresholds = thresholds_to_json(optimizer.interpolated_thresholder_.interpolation_dict)
        self.fairlearn_optimizer_ = optimizer
        return optimizer

    def _labels(self, codes: np.ndarray) -> np.ndarray:
        return group_labels(sensitive_frame(codes, self.columns, self.columns, self.group_names))

    def _before_after(self, data: dict[str, Any]) -> dict[str, Any]:
        groups = self._labels(data["codes"])
        before = (data["scores"] >= self.threshold).astype(np.int64)
        after = self.predictor().predict_scores(data["scores"], groups, random_state=self.random_state)
        return {
            "before": disparity_summary(data["y"], before, groups),
            "after": disparity_summary(data["y"], after, groups),
            "samples": len(data["y"]),
        }

    def predictor(self) -> ThresholdPredictor:
        """A :class:`ThresholdPredictor` applying the fitted thresholds."""
        if not self.thresholds:
            raise RuntimeError("ThresholdOptimizer is not fitted yet (it fits at the end of trainer.fit).")
        return ThresholdPredictor(
            self.thresholds, self.columns, self.group_names, self.positive_label, self.activation, self.batch_keys
        )

    def _save(self, trainer: pl.Trainer) -> None:
        file = f"threshold_optimizer_{self.name or entry_name(self.columns)}.json"
        write_json(artifact_dir(trainer, "fairness") / file, self.report())

    # report / checkpoint ----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The fitted thresholds and the numbers before/after them (test when it ran, else validation)."""
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

    @override
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

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.thresholds = dict(state_dict.get("thresholds", {}))
        self.group_names = dict(state_dict.get("group_names", {})) or self.group_names
        self.results = dict(state_dict.get("results", {}))
        self.fitted_on = state_dict.get("fitted_on")
