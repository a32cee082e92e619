"""Split-conformal prediction sets with MAPIE (LAC, APS, RAPS), marginal or group-conditional
(Mondrian), and their coverage and set size as count states.

MAPIE does the conformal work: its ``SplitConformalClassifier`` (``prefit=True``) is
conformalized on the calibration samples' class probabilities through an estimator whose
``predict_proba`` returns its input (:class:`GivenProbabilities`), then predicts the sets. The
Mondrian option fits one classifier per group of a column (Vovk's group-conditional conformal
prediction): each group's coverage is then guaranteed, not only the marginal one. A group with
fewer calibration samples than the level needs (``n < (1 - alpha) / alpha``) gets the full label
set (the conformal quantile is infinite) and is listed as such.

Example:
    >>> import numpy as np
    >>> probs = np.array([[0.9, 0.1], [0.2, 0.8]] * 20)
    >>> labels = np.array([0, 1] * 20)
    >>> predictor = ConformalPredictor("lac", confidence_level=0.9, num_classes=2).fit(probs, labels)
    >>> predictor.predict_sets(probs[:2]).tolist()
    [[True, False], [False, True]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import Tensor
from torchmetrics import Metric

from lightning_trust.core.seam import mapie_quantile

__all__ = ["SCORES", "ConformalPredictor", "GivenProbabilities", "SetCounts", "min_calibration_samples"]

#: The conformity scores (MAPIE's names): LAC (a.k.a. THR, Sadinle et al.), APS (Romano et al.),
#: RAPS (Angelopoulos et al.).
SCORES: tuple[str, ...] = ("lac", "aps", "raps")


def min_calibration_samples(confidence_level: float) -> int:
    """The fewest calibration samples for a finite conformal quantile: ``ceil((1 - a)(n + 1)) <= n``."""
    alpha = 1.0 - confidence_level
    return max(1, math.ceil((1.0 - alpha) / alpha - 1e-9))


class GivenProbabilities(ClassifierMixin, BaseEstimator):
    """A fitted scikit-learn classifier whose input *is* its class probabilities (the network's)."""

    def __init__(self, n_classes: int = 2) -> None:
        self.n_classes = n_classes

    def fit(self, X: Any = None, y: Any = None) -> GivenProbabilities:
        self.classes_ = np.arange(self.n_classes)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        return np.asarray(X, dtype=np.float64)

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(X).argmax(axis=1)


class ConformalPredictor:
    """MAPIE split-conformal classifiers: one (marginal) or one per group (Mondrian).

    Args:
        score: ``"lac"``, ``"aps"`` or ``"raps"``.
        confidence_level: the target coverage ``1 - alpha``.
        num_classes: the number of classes.
        seed: MAPIE's ``random_state`` (APS/RAPS randomize their calibration scores; RAPS draws
            its split for the regularization).
        include_last_label: APS/RAPS sets: ``True`` (MAPIE's default: the label crossing the
            quantile is kept, conservative), ``False`` or ``"randomized"`` (exact coverage on average).
    """

    def __init__(self, score: str, confidence_level: float, num_classes: int, seed: int = 0,
                 include_last_label: Union[bool, str] = True) -> None:  # fmt: skip
        if score not in SCORES:
            raise ValueError(f"Unknown conformity score {score!r}; use one of {list(SCORES)}.")
        if include_last_label not in (True, False, "randomized"):
            raise ValueError(f"`include_last_label` must be True, False or 'randomized', got {include_last_label!r}.")
        self.score, self.confidence_level, self.num_classes, self.seed = score, confidence_level, num_classes, seed
        self.include_last_label = include_last_label
        self.models: dict[int, Any] = {}
        self.full_set_groups: list[int] = []
        self.calibration_sizes: dict[int, int] = {}
        self.failures: dict[int, str] = {}

    def _model(self, probs: np.ndarray, labels: np.ndarray) -> Any:
        from mapie.classification import SplitConformalClassifier

        estimator = GivenProbabilities(self.num_classes).fit()
        model = SplitConformalClassifier(estimator, confidence_level=self.confidence_level,
                                         conformity_score=self.score, prefit=True, random_state=self.seed)  # fmt: skip
        model.conformalize(probs, labels)
        model.predict_set(np.full((1, self.num_classes), 1.0 / self.num_classes))  # MAPIE sets its quantile here
        return model

    def fit(self, probs: np.ndarray, labels: np.ndarray, groups: Optional[np.ndarray] = None) -> ConformalPredictor:
        """Conformalize on calibration ``probs`` ``(n, C)`` and ``labels``; per group with ``groups``."""
        groups = np.zeros(len(labels), dtype=np.int64) if groups is None else np.asarray(groups)
        self.models, self.full_set_groups, self.calibration_sizes, self.failures = {}, [], {}, {}
        for g in np.unique(groups).tolist():
            mask = groups == g
            self.calibration_sizes[int(g)] = int(mask.sum())
            if mask.sum() < min_calibration_samples(self.confidence_level):
                self.full_set_groups.append(int(g))
                continue
            try:
                self.models[int(g)] = self._model(probs[mask], labels[mask])
            except ValueError as err:  # RAPS's stratified split of a small group with a singleton class
                if self.score != "raps":
                    raise
                self.failures[int(g)] = str(err)
                self.full_set_groups.append(int(g))
        return self

    def quantiles(self) -> dict[int, float]:
        """Each fitted group's conformal quantile (MAPIE's, through the seam)."""
        return {g: mapie_quantile(model) for g, model in self.models.items()}

    def predict_sets(self, probs: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
        """Boolean prediction sets ``(n, C)``; a group without a fitted classifier gets the full set."""
        groups = np.zeros(len(probs), dtype=np.int64) if groups is None else np.asarray(groups)
        sets = np.ones((len(probs), self.num_classes), dtype=bool)
        for g in np.unique(groups).tolist():
            model = self.models.get(int(g))
            mask = groups == g
            if model is not None and mask.any():
                params = {} if self.score == "lac" else {"include_last_label": self.include_last_label}
                sets[mask] = np.asarray(model.predict_set(probs[mask], conformity_score_params=params)[1])[:, :, 0]
        return sets


class SetCounts(Metric):
    """Covered samples, summed set sizes and sample counts per cell (overall, groups, domains).

    ``membership`` ``(n, cells)`` says which cells each sample is in. States are sums, reduced
    across processes.

    Example:
        >>> m = SetCounts(cells=2)
        >>> sets = torch.tensor([[True, True], [True, False], [False, True]])
        >>> m.update(sets, torch.tensor([0, 1, 1]), torch.tensor([[1, 0], [1, 1], [0, 1]]).bool())
        >>> [v.tolist() for v in m.compute()]
        [[1, 1], [3, 2], [2, 2]]
    """

    full_state_update = False
    covered: Tensor
    size: Tensor
    count: Tensor

    def __init__(self, cells: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("covered", "size", "count"):
            self.add_state(name, torch.zeros(cells, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, sets: Tensor, target: Tensor, membership: Tensor) -> None:
        inside = sets.gather(1, target.long().reshape(-1, 1)).reshape(-1).long()
        member = membership.long()
        self.covered += inside @ member
        self.size += sets.long().sum(dim=1) @ member
        self.count += member.sum(dim=0)

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.covered, self.size, self.count


def coverage_rows(names: Sequence[str], counts: tuple[Tensor, Tensor, Tensor], target: float) -> dict[str, Any]:
    """``{cell: {coverage, mean_set_size, samples, coverage_gap}}`` (``None`` for an empty cell)."""
    covered, size, count = (v.reshape(-1).tolist() for v in counts)  # torchmetrics squeezes one cell
    out: dict[str, Any] = {}
    for name, c, s, n in zip(names, covered, size, count):
        if n == 0:
            out[name] = {"coverage": None, "mean_set_size": None, "samples": 0, "coverage_gap": None}
            continue
        out[name] = {"coverage": c / n, "mean_set_size": s / n, "samples": int(n), "coverage_gap": target - c / n}
    return out
