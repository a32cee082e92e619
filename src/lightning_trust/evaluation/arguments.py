"""What :class:`~lightning_trust.evaluation.CrossDomainEvaluation` refuses at construction: arguments
that name no domain, contradict each other or are out of range; and the checked, resolved values.

Example:
    >>> checked = check_arguments(corruptions=["blur"], metrics=["ece"])
    >>> checked.corruptions, checked.metric_names  # the corruption error needs the accuracy
    (['blur'], ['ece', 'accuracy'])
    >>> check_arguments(domain_key="native_region", severities=[1, 1])
    Traceback (most recent call last):
    ...
    ValueError: `severities` lists a severity twice: [1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

from lightning_trust.evaluation.corruptions import SEVERITIES, resolve_corruptions
from lightning_trust.evaluation.metrics import MetricSpec

__all__ = ["CheckedArguments", "check_arguments"]


class CheckedArguments(NamedTuple):
    """The arguments :func:`check_arguments` resolves: the corruption names, the extra domains, the
    metric specs (with ``accuracy`` added for the corruption error) and their names."""

    corruptions: list[str]
    domains: dict[str, Any]
    specs: list[MetricSpec]
    metric_names: list[str]


def check_arguments(
    domain_key: Optional[str] = None,
    domain_values: Optional[Sequence[Union[str, int]]] = None,
    domains: Optional[Mapping[str, Any]] = None,
    corruptions: Union[str, list[str], None] = None,
    severities: Sequence[int] = SEVERITIES,
    baseline_errors: Optional[str] = None,
    metrics: Sequence[str] = ("accuracy", "nll", "ece"),
    metric_args: Optional[Mapping[str, dict[str, Any]]] = None,
    every_n_epochs: int = 1,
    prediction_type: str = "logits",
    num_classes: Optional[int] = None,
    value_range: Sequence[float] = (0.0, 1.0),
    batch_size: Optional[int] = None,
    buffer_size: int = 8192,
) -> CheckedArguments:
    """Raise ``ValueError`` on the first argument of ``CrossDomainEvaluation`` that cannot work (with
    what to set instead); return the resolved corruptions, domains and metrics."""
    if domain_key is not None and (not isinstance(domain_key, str) or not domain_key):
        raise ValueError(f"`domain_key` must be a side-column name, got {domain_key!r}.")
    resolved = resolve_corruptions(corruptions)
    if domains is not None and not isinstance(domains, Mapping):
        raise ValueError(f"`domains` must map a domain name to a dataset, dataloader or method name, got {domains!r}.")
    extra = dict(domains or {})
    if domain_key is None and not extra and not resolved:
        raise ValueError(
            "CrossDomainEvaluation has no domains: set `domain_key` (a side column such as 'native_region'), "
            "`domains` (extra datasets) or `corruptions`."
        )
    if domain_key is None and domain_values is not None:
        raise ValueError("`domain_values` needs a `domain_key` to read them from.")
    if (
        not isinstance(severities, (list, tuple))
        or not severities
        or any(not isinstance(s, int) or not 1 <= s <= 5 for s in severities)
    ):
        raise ValueError(f"`severities` must be a non-empty list of ints in 1..5, got {severities!r}.")
    if len(set(severities)) != len(severities):
        raise ValueError(f"`severities` lists a severity twice: {severities}.")
    if baseline_errors is not None and not resolved:
        raise ValueError("`baseline_errors` normalizes the corruption error; set `corruptions` too.")
    specs, names = _metric_specs(metrics, metric_args, corruption_error=bool(resolved))
    if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
        raise ValueError(f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}.")
    if prediction_type not in ("logits", "probs"):
        raise ValueError(f"`prediction_type` must be 'logits' or 'probs', got {prediction_type!r}.")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
    if len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise ValueError(f"`value_range` must be (low, high) with low < high, got {value_range!r}.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"`buffer_size` must be a positive integer, got {buffer_size!r}.")
    return CheckedArguments(resolved, extra, specs, names)


def _metric_specs(
    metrics: Sequence[str], metric_args: Optional[Mapping[str, dict[str, Any]]], corruption_error: bool
) -> tuple[list[MetricSpec], list[str]]:
    """The metric specs and their names; ``accuracy`` is added when the corruption error needs it."""
    if not isinstance(metrics, (list, tuple)) or not metrics:
        raise ValueError(f"`metrics` must be a non-empty list of metric names, got {metrics!r}.")
    args = dict(metric_args or {})
    unknown_args = [k for k in args if k not in metrics]
    if unknown_args:
        raise ValueError(f"`metric_args` names metrics not in `metrics` {list(metrics)}: {unknown_args}.")
    metric_list = list(metrics)
    if corruption_error and "accuracy" not in metric_list:
        metric_list.append("accuracy")  # the corruption error is 1 - accuracy
    specs = [MetricSpec.from_name(m, args.get(m)) for m in metric_list]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"`metrics` has two metrics with one name: {names}.")
    return specs, names
