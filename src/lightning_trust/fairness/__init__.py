"""lightning_trust.fairness: group fairness metrics (Fairlearn MetricFrame) and bias mitigation.

* :class:`FairnessMetrics`: streaming, DDP-correct per-group metrics and disparity summaries.
* :class:`FairnessPenalty`: in-processing demographic-parity / equalized-odds loss penalty.
* :class:`ThresholdOptimizer`: post-processing with fairlearn's ThresholdOptimizer;
  :class:`ThresholdPredictor` applies the fitted thresholds.
"""

from lightning_trust.fairness._core import METRICS, SUMMARIES, FairnessState
from lightning_trust.fairness.metrics import FairnessBreachError, FairnessMetrics
from lightning_trust.fairness.mitigation import FairnessPenalty, ThresholdOptimizer, ThresholdPredictor, fairness_penalty

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
]
