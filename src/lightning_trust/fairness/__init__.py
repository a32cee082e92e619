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
