"""``ThresholdPredictor``: applies per-group thresholds fitted by
:class:`~lightning_trust.fairness.ThresholdOptimizer` (fairlearn's ``InterpolatedThresholder``) to a
model's scores, in a checkpoint or outside Lightning; and the JSON form of those thresholds.

Example:
    >>> import numpy as np
    >>> from lightning_trust.fairness import ThresholdOptimizer
    >>> scores, y = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1]), np.array([1, 1, 0, 1, 0, 0])
    >>> groups = np.array(["F", "F", "F", "M", "M", "M"], dtype=object)
    >>> optimizer = ThresholdOptimizer("sex", grid_size=20)
    >>> _ = optimizer.fit_arrays(scores, y, groups)
    >>> predictor = ThresholdPredictor(optimizer.thresholds, "sex")
    >>> predictor.predict_scores(scores, groups, random_state=0).shape
    (6,)
    >>> thresholds_to_json(thresholds_from_json(optimizer.thresholds)) == optimizer.thresholds
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import Bunch
from torch import Tensor

from lightning_trust.core.batch import BatchContract, forward_no_grad
from lightning_trust.core.seam import fairlearn_threshold_classes, thresholder_positive_probability
from lightning_trust.fairness.groups import group_labels, read_codes, sensitive_frame, single_entry
from lightning_trust.fairness.predictions import Activation, class_scores, positive_score

__all__ = ["PrefitScores", "ThresholdPredictor", "thresholds_from_json", "thresholds_to_json"]


class PrefitScores(BaseEstimator):
    """A prefit 'estimator' whose prediction is the score column it is given (the model ran already)."""

    def fit(self, X: Any, y: Any = None, **kwargs: Any) -> PrefitScores:
        return self

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(X, dtype=float)[:, 0]

    def __sklearn_is_fitted__(self) -> bool:
        return True


def thresholds_to_json(interpolation: Mapping[Any, Any]) -> dict[str, dict[str, Any]]:
    """fairlearn's per-group interpolation (``Bunch`` of thresholds) as plain JSON."""
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


def thresholds_from_json(thresholds: Mapping[str, Mapping[str, Any]]) -> dict[str, Bunch]:
    """The inverse of :func:`thresholds_to_json`: fairlearn's interpolation dict."""
    _, threshold_operation = fairlearn_threshold_classes()
    out: dict[str, Bunch] = {}
    for group, e in thresholds.items():
        fields: dict[str, Any] = {
            "p0": e["p0"],
            "operation0": threshold_operation(e["operation0"][0], e["operation0"][1]),
            "p1": e["p1"],
            "operation1": threshold_operation(e["operation1"][0], e["operation1"][1]),
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
        >>> predictor = ThresholdPredictor.from_checkpoint("last.ckpt")  # doctest: +SKIP
        >>> labels = predictor.predict(model, batch, random_state=0)  # doctest: +SKIP
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
        self.columns = single_entry(sensitive_feature)
        self.group_names = dict(group_names or {})
        self.positive_label = positive_label
        self.activation = activation
        self.contract = BatchContract.from_keys(batch_keys)
        interpolated_thresholder, _ = fairlearn_threshold_classes()
        self.thresholder = interpolated_thresholder(
            estimator=PrefitScores(),
            interpolation_dict=thresholds_from_json(self.thresholds),
            prefit=True,
            predict_method="predict",
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
        return np.asarray(thresholder_positive_probability(self.thresholder, scores, groups))

    def predict_scores(self, scores: np.ndarray, groups: np.ndarray, random_state: Optional[int] = None) -> np.ndarray:
        """0/1 predictions for positive-class ``scores`` of samples in ``groups`` (group names)."""
        self._check_groups(groups)
        return np.asarray(
            self.thresholder.predict(
                np.asarray(scores, dtype=float).reshape(-1, 1), sensitive_features=groups, random_state=random_state
            )
        )

    def groups_of(self, batch: Any) -> np.ndarray:
        """The group label of every sample of ``batch``."""
        codes = read_codes(self.contract, batch, self.columns, torch.device("cpu")).numpy()
        return group_labels(sensitive_frame(codes, self.columns, self.columns, self.group_names))

    def scores_of(self, module: torch.nn.Module, batch: Any) -> np.ndarray:
        """The positive-class score of every sample of ``batch``."""
        preds = forward_no_grad(module, self.contract.inputs(batch))
        return positive_score(class_scores(preds, self.activation), self.positive_label).cpu().numpy()

    def predict(self, module: torch.nn.Module, batch: Any, random_state: Optional[int] = None) -> Tensor:
        """Fair 0/1 predictions of ``module`` on ``batch`` (inputs and sensitive columns from the batch)."""
        return torch.as_tensor(self.predict_scores(self.scores_of(module, batch), self.groups_of(batch), random_state))
