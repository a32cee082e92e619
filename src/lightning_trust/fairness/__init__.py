"""lightning_trust.fairness: group fairness metrics (equal to Fairlearn's MetricFrame) and bias mitigation.

* :class:`FairnessMetrics`: streaming, DDP-correct per-group metrics and disparity summaries from
  per-group confusion counts (memory independent of the rows).
* :class:`FairnessPenalty`: in-processing demographic-parity / equalized-odds loss penalty.
* :class:`ThresholdOptimizer`: post-processing with fairlearn's ThresholdOptimizer;
  :class:`ThresholdPredictor` applies the fitted thresholds.

=================  ==========================================================================
module             concern
=================  ==========================================================================
``groups``         metric functions by name, summaries, feature entries, group codes and names
``predictions``    class scores, the positive-class score, hard predictions
``counts``         the count tables per group and class, Poisson-bootstrap replicates (``GroupCounts``)
``tables``         from counts to numbers: per-group metrics, summaries, intervals, flags (= MetricFrame)
``collect``        per batch: predictions, labels and codes into the tables, checked once
``checks``         early refusals: sensitive columns, target, prediction shape, a missing step
``state``          per-sample scores for ``ThresholdOptimizer`` (fairlearn's fit needs samples)
``frame``          the results as a table: CSV rows and bar charts
``metrics``        the ``FairnessMetrics`` callback
``metrics_args``   its arguments, checked
``breaches``       declared limits: breaches, warnings once per run, ``FairnessBreachError``
``publish``        what it logs and the files it writes (CSV table, JSON, bar charts)
``penalty``        the ``FairnessPenalty`` callback and its differentiable group gap
``thresholds``     the ``ThresholdOptimizer`` callback
``predictor``      ``ThresholdPredictor``: the fitted thresholds applied to scores; their JSON form
=================  ==========================================================================

Example:
    >>> from lightning_trust.fairness import METRICS, SUMMARIES
    >>> "selection_rate" in METRICS, SUMMARIES[0]
    (True, 'demographic_parity_difference')
"""

from lightning_trust.fairness.groups import METRICS, SUMMARIES
from lightning_trust.fairness.metrics import FairnessBreachError, FairnessMetrics
from lightning_trust.fairness.penalty import FairnessPenalty, fairness_penalty, group_gap
from lightning_trust.fairness.predictor import ThresholdPredictor
from lightning_trust.fairness.state import FairnessState
from lightning_trust.fairness.thresholds import ThresholdOptimizer

__all__ = [
    "METRICS",
    "SUMMARIES",
    "FairnessBreachError",
    "FairnessMetrics",
    "FairnessPenalty",
    "FairnessState",
    "ThresholdOptimizer",
    "ThresholdPredictor",
    "fairness_penalty",
    "group_gap",
]
