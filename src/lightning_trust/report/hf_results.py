"""The card's numbers as Hugging Face ``model-index`` evaluation results (``huggingface_hub.EvalResult``).

- the model's own validation/test metrics (``val/acc``, ``test/loss``) on the whole data set and split;
- every ``per_domain`` table of a section (``evaluation.per_domain.<domain>.<metric>``) and every
  ``by_group`` table (``fairness.by_group.<feature>.<group>.<metric>``), as separate results: the
  subset is the result's dataset ``config`` (``native_region=Asia``, ``sex=Female``), so the Hub keeps
  one result per subset (its key is task, dataset type, config, split and revision);
- the group disparities (``*_difference``, ``*_ratio``) a fairness section reports at its top level
  (``fairness.demographic_parity_difference``; a section is a fairness one by
  :func:`~lightning_trust.report.regulation.topic_of`).

A number without a value (NaN, an empty domain) is left out; the metric's ``name`` is the card's
dotted name, so each result can be traced back to ``model_card.json``.

Example:
    >>> card = {"metrics": {"val/acc": 0.9, "train/loss": 0.3}, "data": {"datamodule": "pkg.AdultDataModule"},
    ...         "sections": {"evaluation": {"stage": "validate", "domain_key": "region",
    ...                                     "per_domain": {"Asia": {"accuracy": 0.8}, "Other": {"accuracy": None}}}}}
    >>> [(r.dataset_config, r.metric_type, r.metric_value, r.metric_name) for r in eval_results(card, "tabular-classification")]
    [(None, 'accuracy', 0.9, 'val/acc'), ('region=Asia', 'accuracy', 0.8, 'evaluation.per_domain.Asia.accuracy')]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional

from lightning_trust.report.regulation import topic_of

if TYPE_CHECKING:
    from huggingface_hub import EvalResult

__all__ = ["dataset_identity", "eval_results", "metric_id"]

#: Logged-name tails and their Hub metric ids.
_METRIC_IDS = {
    "acc": "accuracy", "accuracy": "accuracy", "f1": "f1", "auroc": "roc_auc", "auc": "roc_auc",
    "precision": "precision", "recall": "recall", "loss": "loss", "nll": "nll", "ece": "ece", "brier": "brier",
    "mse": "mse", "mae": "mae", "ppl": "perplexity", "perplexity": "perplexity",
}  # fmt: skip
_SPLITS = {"val": "validation", "valid": "validation", "validation": "validation", "validate": "validation",
           "test": "test", "testing": "test"}  # fmt: skip
#: Keys of a per-group or per-domain record that are not metrics.
_NOT_METRICS = frozenset({"count", "size", "samples", "num_samples", "n", "small", "log_name"})
_DISPARITY = re.compile(r".+_(difference|ratio)$")


def metric_id(name: str) -> str:
    """The Hub metric id of a logged or reported metric name: ``val/acc`` -> ``accuracy``."""
    tail = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    tail = tail[: -len("_epoch")] if tail.endswith("_epoch") else tail
    return _METRIC_IDS.get(tail.lower(), re.sub(r"[^a-z0-9_]+", "_", tail.lower()).strip("_") or "value")


def dataset_identity(card: Mapping[str, Any], dataset_id: Optional[str] = None) -> tuple[str, str]:
    """``(type, pretty name)`` of the data set: a Hub id when given (``dataset_id``, else the card's
    ``data.datasets[0]``), else made from the datamodule's class name (``AdultDataModule`` -> ``adult``, ``Adult``)."""
    data = card.get("data") or {}
    hub_id = dataset_id or next(iter(data.get("datasets") or []), None)
    cls = str(data.get("datamodule") or card.get("title") or "data").rsplit(".", 1)[-1]
    base = re.sub(r"(DataModule|Datamodule|Module)$", "", cls) or cls
    pretty = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", base)
    slug = re.sub(r"[^a-z0-9]+", "-", pretty.lower()).strip("-") or "data"
    return (hub_id or slug), (hub_id.rsplit("/", 1)[-1] if hub_id and not data.get("datamodule") else pretty)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metrics_of(record: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted metric, value)`` of a per-subset record (nested metric dicts flattened)."""
    if _number(record):
        yield prefix.rstrip("."), float(record)
        return
    if not isinstance(record, Mapping):
        return
    for key, value in record.items():
        if str(key) not in _NOT_METRICS:
            yield from _metrics_of(value, f"{prefix}{key}.")


def _subsets(name: str, section: Mapping[str, Any]) -> Iterator[tuple[str, str, str, float]]:
    """``(config, metric path, card name, value)`` of every per-domain and per-group number of a section."""
    per_domain = section.get("per_domain")
    if isinstance(per_domain, Mapping):
        key = section.get("domain_key") or "domain"
        for domain, record in per_domain.items():
            for metric, value in _metrics_of(record):
                yield f"{key}={domain}", metric, f"{name}.per_domain.{domain}.{metric}", value
    by_group = section.get("by_group")
    if isinstance(by_group, Mapping):
        for feature, groups in by_group.items():
            for group, record in (groups or {}).items() if isinstance(groups, Mapping) else ():
                for metric, value in _metrics_of(record):
                    yield f"{feature}={group}", metric, f"{name}.by_group.{feature}.{group}.{metric}", value


def eval_results(card: Mapping[str, Any], task_type: str, dataset_id: Optional[str] = None) -> list[EvalResult]:
    """The card's measured numbers as ``EvalResult`` objects (see the module docstring for which)."""
    from huggingface_hub import EvalResult

    dataset_type, pretty = dataset_identity(card, dataset_id)

    def result(value: float, metric: str, name: str, split: Optional[str], config: Optional[str] = None) -> EvalResult:
        return EvalResult(
            task_type=task_type, dataset_type=dataset_type,
            dataset_name=f"{pretty} ({config})" if config else pretty, dataset_config=config,
            dataset_split=split, metric_type=metric_id(metric), metric_value=value, metric_name=name,
        )  # fmt: skip

    out = []
    for name, value in card.get("metrics", {}).items():
        head, _, tail = name.partition("/")
        if tail and head in _SPLITS and _number(value) and not tail.endswith("_step"):
            out.append(result(float(value), tail, name, _SPLITS[head]))
    for section_name, section in card.get("sections", {}).items():
        if not isinstance(section, Mapping):
            continue
        split = _SPLITS.get(str(section.get("stage", "")).lower())
        for key, value in section.items():
            disparity = _DISPARITY.match(str(key)) and topic_of(f"{section_name}.{key}") == "accuracy_per_group"
            if disparity and _number(value):
                out.append(result(float(value), str(key), f"{section_name}.{key}", split))
        for config, metric, card_name, number in _subsets(section_name, section):
            out.append(result(number, metric, card_name, split, config))
    return out
