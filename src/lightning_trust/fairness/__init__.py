"""lightning_trust.fairness: group fairness metrics (Fairlearn MetricFrame) and bias mitigation.

* :class:`FairnessMetrics`: streaming, DDP-correct per-group metrics and disparity summaries.
* :class:`FairnessPenalty`: in-processing demographic-parity / equalized-odds loss penalty.
* :class:`ThresholdOptimizer`: post-processing with fairlearn's ThresholdOptimizer;
  :class:`ThresholdPredictor` applies the fitted thresholds.

=================  ==========================================================================
module             concern
=================  ==========================================================================
``groups``         metric functions by name, summaries, feature entries, group codes and names
``predictions``    class scores, the positive-class score, hard predictions
``state``          the streaming, DDP-gathered state (a torchmetrics ``Metric``)
``frame``          MetricFrame read out into JSON: tables, summaries, intervals, flags, CSV rows
``metrics``        the ``FairnessMetrics`` callback
``penalty``        the ``FairnessPenalty`` callback and its differentiable group gap
``thresholds``     the ``ThresholdOptimizer`` callback and ``ThresholdPredictor``
=================  ==========================================================================

Example:
    >>> from lightning_trust.fairness import METRICS, SUMMARIES
    >>> "selection_rate" in METRICS, SUMMARIES[0]
    (True, 'demographic_parity_difference')
"""

from lightning_trust.fairness.groups import METRICS, SUMMARIES
from lightning_trust.fairness.metrics import FairnessBreachError, FairnessMetrics
from lightning_trust.fairness.penalty import FairnessPenalty, fairness_penalty, group_gap
from lightning_trust.fairness.state import FairnessState
from lightning_trust.fairness.thresholds import ThresholdOptimizer, ThresholdPredictor

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
