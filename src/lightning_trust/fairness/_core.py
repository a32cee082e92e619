"""Shared pieces of the fairness area: metric functions by name, sensitive-feature entries,
prediction handling, the streaming state (a torchmetrics ``Metric``) and the MetricFrame table.

Every number comes from :class:`fairlearn.metrics.MetricFrame`; this module only chooses the
functions, feeds the arrays and reads the frame out into plain JSON.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
import pandas as pd
import torch
from fairlearn.metrics import (
    MetricFrame,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_trust.core.batch import BatchContract, batch_size_of, predictions_from_outputs
from lightning_trust.core import isolated_eval

FeatureEntry = Union[str, list[str]]
INTERSECTION = "*"  # "sex*race" names the intersection of sex and race


def _undefined_when(kind: str, fn: Callable[..., float]) -> Callable[..., float]:
    """Fairlearn's rate ``fn`` but NaN where its denominator is empty (fairlearn returns 0.0 there).

    ``kind``: "positives" (TPR/FNR/recall need y_true == 1), "negatives" (FPR needs y_true == 0).
    """

    @functools.wraps(fn)
    def metric(y_true: Any, y_pred: Any, **kwargs: Any) -> float:
        y = np.asarray(y_true)
        if kind == "positives" and not np.any(y == 1):
            return float("nan")
        if kind == "negatives" and not np.any(y == 0):
            return float("nan")
        return float(fn(y_true, y_pred, **kwargs))

    return metric


def _count(y_true: Any, y_pred: Any, sample_weight: Any = None) -> int:
    """fairlearn's ``count`` (samples in the group), also for weighted (compressed) rows."""
    return int(len(y_true) if sample_weight is None else np.sum(sample_weight))


#: Metric functions by name: Fairlearn's and scikit-learn's own, with empty denominators giving NaN
#: (flagged in the results) instead of a silent 0.0.
METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "selection_rate": selection_rate,
    "true_positive_rate": _undefined_when("positives", true_positive_rate),
    "false_positive_rate": _undefined_when("negatives", false_positive_rate),
    "false_negative_rate": _undefined_when("positives", false_negative_rate),
    "precision": functools.partial(precision_score, zero_division=np.nan),
    "recall": functools.partial(recall_score, zero_division=np.nan),
    "f1": functools.partial(f1_score, zero_division=np.nan),
    "count": _count,
}
#: Why a metric can be undefined in a group (used for flags).
UNDEFINED_REASON: dict[str, str] = {
    "true_positive_rate": "no positives (y_true == 1) in the group",
    "false_negative_rate": "no positives (y_true == 1) in the group",
    "recall": "no positives (y_true == 1) in the group",
    "false_positive_rate": "no negatives (y_true == 0) in the group",
    "precision": "no predicted positives in the group",
    "f1": "no positives and no predicted positives in the group",
}
SUMMARIES: tuple[str, ...] = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equalized_odds_ratio",
    "equal_opportunity_difference",
    "equal_opportunity_ratio",
)
#: The metrics every table holds (summaries and group sizes need them), besides the requested ones.
_REQUIRED = ("selection_rate", "true_positive_rate", "false_positive_rate", "count")


def is_ratio(summary: str) -> bool:
    return summary.endswith("_ratio")


def worst(summary: str, values: Sequence[float]) -> float:
    """The worst of ``values`` for ``summary``: the largest difference, the smallest ratio (NaN skipped)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return float("nan")
    return min(finite) if is_ratio(summary) else max(finite)


def validate_metrics(metrics: Sequence[str]) -> list[str]:
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown fairness metric(s) {unknown}; choose from {sorted(METRICS)}.")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"`metrics` lists a metric twice: {metrics}.")
    return metrics


def parse_entries(sensitive_features: Union[FeatureEntry, Sequence[FeatureEntry]]) -> list[list[str]]:
    """``"sex"`` -> ``[["sex"]]``; ``["sex", ["sex", "race"], "race*age_group"]`` -> one list per entry.

    A list entry (or a name joined with ``*``) is an intersection of several side columns.
    """
    if isinstance(sensitive_features, str):
        sensitive_features = [sensitive_features]
    if not isinstance(sensitive_features, Sequence) or not sensitive_features:
        raise ValueError(
            "`sensitive_features` must name at least one side column, e.g. ['sex', 'race', ['sex', 'race']]."
        )
    entries: list[list[str]] = []
    for entry in sensitive_features:
        columns = entry.split(INTERSECTION) if isinstance(entry, str) else list(entry)
        columns = [c.strip() for c in columns]
        if not columns or not all(isinstance(c, str) and c for c in columns):
            raise ValueError(f"Bad sensitive feature entry {entry!r}: use a column name or a list of names.")
        if len(set(columns)) != len(columns):
            raise ValueError(f"Sensitive feature entry {entry!r} repeats a column.")
        if columns in entries:
            raise ValueError(f"Sensitive feature entry {entry!r} is listed twice.")
        entries.append(columns)
    return entries


def entry_name(columns: Sequence[str]) -> str:
    return INTERSECTION.join(columns)


def base_columns(entries: Sequence[Sequence[str]]) -> list[str]:
    """Distinct side columns used by the entries, in first-use order."""
    seen: list[str] = []
    for columns in entries:
        for c in columns:
            if c not in seen:
                seen.append(c)
    return seen


def read_codes(contract: BatchContract, batch: Any, columns: Sequence[str], device: torch.device) -> Tensor:
    """The side columns of ``batch`` as an integer tensor ``[batch, len(columns)]`` on ``device``."""
    out = []
    for name in columns:
        value = contract.side(batch, name)
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value)
        if value.is_floating_point() or value.is_complex():
            raise TypeError(
                f"Side column {name!r} holds {value.dtype} values; sensitive features must be integer group "
                "codes (names come from `datamodule.categories[name]`)."
            )
        out.append(value.reshape(-1).to(device=device, dtype=torch.long))
    return torch.stack(out, dim=1)


def group_names(trainer: Any, column: str) -> Optional[list[str]]:
    """``trainer.datamodule.categories[column]`` when the datamodule names the codes."""
    categories = getattr(getattr(trainer, "datamodule", None), "categories", None)
    if isinstance(categories, Mapping) and isinstance(categories.get(column), (list, tuple)):
        return [str(n) for n in categories[column]]
    return None


def decode(codes: np.ndarray, names: Optional[Sequence[str]]) -> np.ndarray:
    """Integer codes -> group names (the code itself, as text, where no name is known)."""
    out = np.array([str(int(c)) for c in codes], dtype=object)
    if names:
        table = np.array(list(names), dtype=object)
        inside = (codes >= 0) & (codes < len(table))
        out[inside] = table[codes[inside]]
    return out


def sensitive_frame(codes: np.ndarray, columns: Sequence[str], all_columns: Sequence[str], names: Mapping[str, Optional[list[str]]]) -> Union[pd.Series, pd.DataFrame]:
    """The ``sensitive_features`` argument of MetricFrame for one entry: named group labels."""
    decoded = {c: decode(codes[:, all_columns.index(c)], names.get(c)) for c in columns}
    if len(columns) == 1:
        return pd.Series(decoded[columns[0]], name=columns[0])
    return pd.DataFrame(decoded)


def group_label(columns: Sequence[str], key: Any) -> str:
    """A group's name in tables and reports: ``"Female"`` or ``"Female,White"`` for an intersection."""
    if len(columns) == 1:
        return str(key[0] if isinstance(key, tuple) else key)
    return ",".join(str(k) for k in key)


def log_group(columns: Sequence[str], key: Any) -> str:
    """A group's name in logged keys: ``"sex=Female"`` or ``"sex=Female,race=White"``."""
    keys = key if isinstance(key, tuple) else (key,)
    return ",".join(f"{c}={k}" for c, k in zip(columns, keys))


# predictions ----------------------------------------------------------------------------------
def class_scores(preds: Tensor, activation: str) -> Tensor:
    """Scores in [0, 1]: ``[B]`` (binary, the positive class score) or ``[B, C]`` (one per class).

    ``activation``: "auto" = softmax over a class dimension of 2+, sigmoid for a single logit;
    "softmax", "sigmoid" or "none" (already probabilities) as named.
    """
    preds = preds.float()
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim not in (1, 2):
        raise ValueError(
            f"Predictions of shape {tuple(preds.shape)} are neither per-sample scores [B] nor class logits [B, C]."
        )
    if activation == "none":
        return preds
    if activation == "sigmoid" or (activation == "auto" and preds.ndim == 1):
        return torch.sigmoid(preds)
    if preds.ndim == 1:
        raise ValueError("`activation='softmax'` needs class logits [B, C]; got per-sample scores [B].")
    return torch.softmax(preds, dim=1)


def positive_score(scores: Tensor, positive_label: int) -> Tensor:
    """The positive class score from :func:`class_scores` output (``[B]`` passes through)."""
    if scores.ndim == 1:
        return scores
    if scores.shape[1] != 2:
        raise ValueError(f"A positive-class score needs 2 classes; the predictions have {scores.shape[1]}.")
    if positive_label not in (0, 1):
        raise ValueError(f"`positive_label` must be 0 or 1 for 2-class logits, got {positive_label}.")
    return scores[:, positive_label]


def hard_predictions(preds: Tensor, target: Tensor, activation: str, positive_label: int, threshold: float) -> tuple[Tensor, Tensor, int]:
    """(y_true, y_pred, num_classes): 0/1 arrays for binary predictions, class indices for multiclass.

    All on the predictions' device, no host synchronisation.
    """
    scores = class_scores(preds, activation)
    target = target.reshape(-1).to(scores.device).long()
    if scores.ndim == 1 or scores.shape[1] == 2:
        positive = positive_score(scores, positive_label)
        return (target == positive_label).long(), (positive >= threshold).long(), 2
    return target, scores.argmax(dim=1), int(scores.shape[1])


class ForwardCapture:
    """Keeps the first output of ``module(...)`` whose leading size is the batch's, while armed.

    Lets a callback reuse the forward the user's step already ran instead of running another.
    """

    def __init__(self) -> None:
        self.output: Optional[Tensor] = None
        self._size: Optional[int] = None
        self._handle: Any = None

    def arm(self, module: torch.nn.Module, size: Optional[int]) -> None:
        self.disarm()
        self.output, self._size = None, size
        if size is not None:
            self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        if self.output is None and isinstance(output, Tensor) and output.ndim >= 1 and output.shape[0] == self._size:
            self.output = output

    def disarm(self) -> Optional[Tensor]:
        """Stop listening; the captured output (or ``None``)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        output, self.output = self.output, None
        return output


def step_predictions(
    capture: ForwardCapture, contract: BatchContract, module: torch.nn.Module, batch: Any, outputs: Any, trainer: Any = None
) -> Tensor:
    """The step's predictions: from its outputs, else its own captured forward, else one isolated forward."""
    captured = capture.disarm()
    preds = predictions_from_outputs(outputs, batch_size_of(batch, contract))
    if preds is None and captured is not None:
        preds = captured.detach()
    if preds is None:
        with isolated_eval(module, trainer) as isolated:
            preds = contract.predictions(isolated, batch)
    return preds


class FairnessState(Metric):
    """Streaming state for group fairness: per-sample true/predicted labels and group codes.

    Accumulated on the device with no host sync; ``compute()`` gathers every rank's samples once
    (``dist_reduce_fx="cat"``, uneven sizes handled by torchmetrics) and returns them as tensors.

    Example:
        >>> state = FairnessState()
        >>> state.update(torch.tensor([1, 0]), torch.tensor([1, 1]), torch.tensor([[0], [1]]))
        >>> y_true, y_pred, groups, scores = state.compute()
    """

    full_state_update = False

    def __init__(self, keep_scores: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_scores = keep_scores
        self.add_state("y_true", default=[], dist_reduce_fx="cat")
        self.add_state("y_pred", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, y_true: Tensor, y_pred: Tensor, groups: Tensor, scores: Optional[Tensor] = None) -> None:  # type: ignore[override]
        self.y_true.append(y_true.reshape(-1).long())
        self.y_pred.append(y_pred.reshape(-1).long())
        self.groups.append(groups.long())
        if self.keep_scores:
            if scores is None:
                raise ValueError("FairnessState(keep_scores=True).update needs `scores`.")
            self.scores.append(scores.reshape(-1).float())

    def compute(self) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        scores = dim_zero_cat(self.scores) if self.keep_scores else None
        return dim_zero_cat(self.y_true), dim_zero_cat(self.y_pred), dim_zero_cat(self.groups), scores


# the table ------------------------------------------------------------------------------------
def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def metric_frame(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sensitive_features: Any,
    metrics: Sequence[str],
    n_boot: Optional[int] = None,
    ci_quantiles: Sequence[float] = (0.025, 0.975),
    random_state: Optional[int] = None,
) -> MetricFrame:
    """The MetricFrame of ``metrics`` (plus those the summaries need), with MetricFrame's bootstrap.

    Without bootstrap the samples are first compressed to their distinct (groups, y_true, y_pred)
    rows weighted by their counts: every metric here is a ratio of (weighted) confusion-matrix
    counts, which are exact integers either way, so the numbers are identical to the per-sample
    frame while MetricFrame's per-row Python work shrinks from N rows to at most 4 x groups. The
    bootstrap resamples individual samples, so it gets the per-sample frame.
    """
    names = list(dict.fromkeys([*metrics, *_REQUIRED]))
    sample_params = None
    if not n_boot:
        y_true, y_pred, sensitive_features, weights = _compress(y_true, y_pred, sensitive_features)
        sample_params = {m: {"sample_weight": weights} for m in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's undefined-metric warnings: we flag NaN ourselves
        return MetricFrame(
            metrics={m: METRICS[m] for m in names},
            y_true=y_true,
            y_pred=y_pred,
            sensitive_features=sensitive_features,
            sample_params=sample_params,
            n_boot=n_boot if n_boot else None,
            ci_quantiles=list(ci_quantiles) if n_boot else None,
            random_state=random_state if n_boot else None,
        )


def _compress(y_true: np.ndarray, y_pred: np.ndarray, sensitive_features: Any) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    features = sensitive_features.to_frame() if isinstance(sensitive_features, pd.Series) else sensitive_features
    frame = features.reset_index(drop=True).assign(__y_true=np.asarray(y_true), __y_pred=np.asarray(y_pred))
    counts = frame.value_counts(sort=False).reset_index(name="__weight")
    groups = counts[list(features.columns)]
    if isinstance(sensitive_features, pd.Series):
        groups = groups[sensitive_features.name]
    return counts["__y_true"].to_numpy(), counts["__y_pred"].to_numpy(), groups, counts["__weight"].to_numpy()


def summaries_of(frame: MetricFrame) -> dict[str, float]:
    """The six disparity summaries, exactly as fairlearn's functions compute them from a frame."""
    diff, ratio = frame.difference(), frame.ratio()
    tpr_fpr_diff = [_num(diff["true_positive_rate"]), _num(diff["false_positive_rate"])]
    tpr_fpr_ratio = [_num(ratio["true_positive_rate"]), _num(ratio["false_positive_rate"])]
    return {
        "demographic_parity_difference": _num(diff["selection_rate"]),
        "demographic_parity_ratio": _num(ratio["selection_rate"]),
        # fairlearn: max(eo.difference()) / min(eo.ratio()) over (tpr, fpr), in that order
        "equalized_odds_difference": max(tpr_fpr_diff),
        "equalized_odds_ratio": min(tpr_fpr_ratio),
        "equal_opportunity_difference": _num(diff["true_positive_rate"]),
        "equal_opportunity_ratio": _num(ratio["true_positive_rate"]),
    }


def _ci_pairs(ci: Optional[list[Any]], key: Any) -> Optional[list[float]]:
    if ci is None:
        return None
    return [_num(part[key]) for part in ci]


def table(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sensitive_features: Union[pd.Series, pd.DataFrame],
    columns: Sequence[str],
    metrics: Sequence[str],
    n_boot: Optional[int] = None,
    ci_quantiles: Sequence[float] = (0.025, 0.975),
    random_state: Optional[int] = None,
    min_group_size: int = 0,
) -> dict[str, Any]:
    """One entry's results (plain JSON): summaries (+ ``*_ci``), ``overall``, ``by_group`` and flags."""
    frame = metric_frame(y_true, y_pred, sensitive_features, metrics, n_boot, ci_quantiles, random_state)
    out: dict[str, Any] = dict(summaries_of(frame))
    boot = bool(n_boot)
    if boot:
        diff_ci, ratio_ci = frame.difference_ci(), frame.ratio_ci()
        out["demographic_parity_difference_ci"] = _ci_pairs(diff_ci, "selection_rate")
        out["demographic_parity_ratio_ci"] = _ci_pairs(ratio_ci, "selection_rate")
        out["equal_opportunity_difference_ci"] = _ci_pairs(diff_ci, "true_positive_rate")
        out["equal_opportunity_ratio_ci"] = _ci_pairs(ratio_ci, "true_positive_rate")
        # equalized odds is the max of two differences; MetricFrame bootstraps each one
        out["true_positive_rate_difference_ci"] = _ci_pairs(diff_ci, "true_positive_rate")
        out["false_positive_rate_difference_ci"] = _ci_pairs(diff_ci, "false_positive_rate")
    overall = frame.overall
    out["overall"] = {m: _num(overall[m]) for m in metrics}
    if boot:
        out["overall_ci"] = {m: _ci_pairs(frame.overall_ci, m) for m in metrics}
    by_group: dict[str, dict[str, Any]] = {}
    flags: list[dict[str, Any]] = []
    frame_by_group = frame.by_group
    group_ci = frame.by_group_ci if boot else None
    for key, row in frame_by_group.iterrows():
        label = group_label(columns, key)
        size = int(row["count"])
        cell: dict[str, Any] = {m: _num(row[m]) for m in metrics}
        cell["count"] = size
        if boot:
            for m in metrics:
                cell[f"{m}_ci"] = [_num(part.loc[key, m]) for part in group_ci]  # type: ignore[union-attr]
        small = size < min_group_size
        cell["small"] = small
        if small:
            flags.append({"group": label, "metric": "count", "reason": f"{size} samples < min_group_size {min_group_size}"})
        for m in dict.fromkeys([*metrics, "true_positive_rate", "false_positive_rate"]):
            if m in UNDEFINED_REASON and math.isnan(_num(row[m])):
                flags.append({"group": label, "metric": m, "reason": UNDEFINED_REASON[m]})
        cell["log_name"] = log_group(columns, key)
        by_group[label] = cell
    out["by_group"] = by_group
    out["flags"] = flags
    return out


def fairness_results(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    codes: np.ndarray,
    entries: Sequence[Sequence[str]],
    all_columns: Sequence[str],
    names: Mapping[str, Optional[list[str]]],
    metrics: Sequence[str],
    num_classes: int = 2,
    class_names: Optional[Sequence[str]] = None,
    n_boot: Optional[int] = None,
    ci_quantiles: Sequence[float] = (0.025, 0.975),
    random_state: Optional[int] = None,
    min_group_size: int = 0,
) -> dict[str, Any]:
    """All entries' MetricFrame results and the worst case over them (and over classes, one-vs-rest).

    Binary: ``y_true``/``y_pred`` are 0/1. Multiclass (``num_classes > 2``): class indices; each class
    ``c`` is scored one-vs-rest (``y == c``), per-class numbers sit under ``classes``.
    """
    binary = num_classes <= 2
    classes = [None] if binary else list(range(num_classes))
    class_label = (lambda c: str(class_names[c]) if class_names and c < len(class_names) else str(c))
    result: dict[str, Any] = {"num_samples": int(len(y_true)), "num_classes": int(num_classes)}
    by_feature: dict[str, Any] = {}
    by_group: dict[str, Any] = {}
    flags: list[dict[str, Any]] = []
    overall: dict[str, Any] = {}
    for columns in entries:
        name = entry_name(columns)
        sf = sensitive_frame(codes, columns, all_columns, names)
        per_class: dict[str, Any] = {}
        for c in classes:
            yt, yp = (y_true, y_pred) if c is None else ((y_true == c).astype(np.int64), (y_pred == c).astype(np.int64))
            part = table(yt, yp, sf, columns, metrics, n_boot, ci_quantiles, random_state, min_group_size)
            for flag in part.pop("flags"):
                flags.append({"feature": name, **({} if c is None else {"class": class_label(c)}), **flag})
            per_class["" if c is None else class_label(c)] = part
        if binary:
            part = per_class[""]
            by_group[name] = part.pop("by_group")
            overall = part.pop("overall")
            part.pop("overall_ci", None)
            by_feature[name] = part
        else:
            by_group[name] = {k: v.pop("by_group") for k, v in per_class.items()}
            overall = {k: v.pop("overall") for k, v in per_class.items()}
            entry: dict[str, Any] = {}
            for s in SUMMARIES:
                values = {k: v[s] for k, v in per_class.items()}
                entry[s] = worst(s, list(values.values()))
                entry.setdefault("worst_class", {})[s] = _argworst(s, values)
            entry["classes"] = per_class
            by_feature[name] = entry
    for s in SUMMARIES:
        values = {name: part[s] for name, part in by_feature.items()}
        result[s] = worst(s, list(values.values()))
    result["worst_feature"] = {s: _argworst(s, {n: p[s] for n, p in by_feature.items()}) for s in SUMMARIES}
    result["overall"] = overall
    result["by_feature"] = by_feature
    result["by_group"] = by_group
    result["flags"] = flags
    return result


def _argworst(summary: str, values: Mapping[str, float]) -> Optional[str]:
    target = worst(summary, list(values.values()))
    for key, value in values.items():
        if value == target:
            return key
    return None
