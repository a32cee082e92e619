"""Cross-domain evaluation: per-domain metrics, worst domain, in-domain vs OOD gap, calibration,
image-corruption robustness (ImageNet-C style) and leave-one-domain-out runs.

Example:
    >>> from lightning_trust.evaluation import CrossDomainEvaluation
    >>> callback = CrossDomainEvaluation(domain_key="native_region", in_domain=["United-States"])
"""

from lightning_trust.evaluation.callback import CrossDomainEvaluation
from lightning_trust.evaluation.corruptions import CORRUPTIONS, corrupt, corruption_errors
from lightning_trust.evaluation.data import DomainSubset, HoldOutDomain
from lightning_trust.evaluation.metrics import BrierScore, NegativeLogLikelihood
from lightning_trust.evaluation.uncertainty import UncertaintyEvaluation

__all__ = [
    "CORRUPTIONS",
    "BrierScore",
    "CrossDomainEvaluation",
    "DomainSubset",
    "HoldOutDomain",
    "NegativeLogLikelihood",
    "UncertaintyEvaluation",
    "corrupt",
    "corruption_errors",
]
