"""What :class:`~lightning_trust.evaluation.CrossDomainEvaluation` declares it logs and reports:
metric name (``<placeholder>`` parts match any text) or top-level ``report()`` key -> its one-line
meaning, and which keys of a pass's result the report and its summaries carry.

The callback carries the tables as its ``logged_keys`` / ``report_keys`` ClassVars, which the docs
are generated from and a test checks against a real run.

Example:
    >>> sorted(LOGGED_KEYS)[0]
    'domain/<domain>/<metric>'
    >>> all(key in REPORT_KEYS for key in REPORTED)
    True
"""

from __future__ import annotations

__all__ = ["HISTORY_KEYS", "LOGGED_KEYS", "LOGGED_SUMMARIES", "REPORTED", "REPORT_KEYS", "VALIDATION_KEYS"]

#: Everything the evaluation logs through Lightning's loggers, at the end of each evaluated pass.
LOGGED_KEYS: dict[str, str] = {
    "domain/<domain>/<metric>": "a metric on one domain (the name made safe for keys and files)",
    "domain/summary/<summary>/<metric>": (
        "a summary over the domains: average, weighted_average, worst, in_domain, ood or ood_gap"
    ),
    "domain/summary/corruption_error": "mean corruption error over the corruptions (ImageNet-C's CE/mCE)",
    "domain/summary/relative_corruption_error": "mean relative corruption error (error increase over clean)",
}

#: The top-level keys of :meth:`CrossDomainEvaluation.report()
#: <lightning_trust.evaluation.CrossDomainEvaluation.report>` (besides ``"figures"``).
REPORT_KEYS: dict[str, str] = {
    "evaluated": "whether a pass has run",
    "domain_key": "the side column naming each sample's domain (null without one)",
    "stage": "the pass reported: 'test' when run, else the last 'validate'",
    "epoch": "epoch of that pass",
    "metrics": "the metric names",
    "domains": "every evaluated domain, in order",
    "in_domain_domains": "the in-distribution domains",
    "ood_domains": "the out-of-distribution domains",
    "sizes": "samples per domain",
    "empty_domains": "domains without samples in the pass (their metrics are null)",
    "unlisted_samples": "samples whose domain value is not evaluated",
    "per_domain": "{domain: {metric: value}}",
    "average": "unweighted mean over the domains, per metric",
    "weighted_average": "mean weighted by domain size, per metric",
    "worst": "the worst domain's value, per metric",
    "worst_domain": "the worst domain, per metric",
    "best": "the best domain's value, per metric",
    "best_domain": "the best domain, per metric",
    "in_domain": "unweighted mean over the in-domain domains, per metric",
    "in_domain_weighted": "size-weighted mean over the in-domain domains, per metric",
    "ood": "unweighted mean over the out-of-domain domains, per metric",
    "ood_weighted": "size-weighted mean over the out-of-domain domains, per metric",
    "ood_gap": "how much worse out of domain than in domain, per metric (positive: worse)",
    "corruption_error": "mean corruption error (with corruptions)",
    "relative_corruption_error": "mean relative corruption error (with corruptions)",
    "corruption": "clean error, errors per corruption and severity, CE per corruption (with corruptions)",
    "tables": "paths of the CSV/Markdown tables (and corruption errors JSON) of the pass",
    "extra_passes": "whether the pass ran the corrupted copies and extra domains: 'run', 'skipped' (budget) or 'none'",
    "extra_samples": (
        "what the extra passes evaluated: samples, truncated (cut by the budget) and per source (corruptions, "
        "domains) samples and samples_available"
    ),
    "overhead": (
        "the extra passes' budget during fit: max_overhead, measured overhead, runs, skipped, seconds, pass_seconds"
    ),
    "validation": "the last validation pass's summaries, when the report shows a test pass",
    "history": "one summary per validation pass: epoch, step, average, worst, worst_domain, ood_gap, extra_passes",
}

#: The summaries logged as ``domain/summary/<summary>/<metric>``.
LOGGED_SUMMARIES: tuple[str, ...] = ("average", "weighted_average", "worst", "in_domain", "ood", "ood_gap")
#: The keys of a pass's result that the report shows, in order.
REPORTED: tuple[str, ...] = (
    "stage", "epoch", "metrics", "domains", "in_domain_domains", "ood_domains", "sizes", "empty_domains",
    "unlisted_samples", "per_domain", "average", "weighted_average", "worst", "worst_domain", "best", "best_domain",
    "in_domain", "in_domain_weighted", "ood", "ood_weighted", "ood_gap", "corruption_error",
    "relative_corruption_error", "corruption", "tables", "extra_passes", "extra_samples",
)  # fmt: skip
#: The keys of a validation pass's result kept in the ``history``, one entry per pass.
HISTORY_KEYS: tuple[str, ...] = ("epoch", "step", "average", "worst", "worst_domain", "ood_gap", "extra_passes")
#: The keys of the last validation pass that a report of a test pass shows under ``"validation"``.
VALIDATION_KEYS: tuple[str, ...] = ("epoch", "per_domain", "average", "worst", "ood_gap")
