"""Explanations during training: Captum attributions of a fixed sample (``Attribution``) and an
adversarial robustness check with Captum's FGSM/PGD (``AdversarialRobustness``)."""

from lightning_trust.explain.attribution import Attribution, Explanation, rank_correlation
from lightning_trust.explain.methods import BASELINES, METHODS
from lightning_trust.explain.robustness import ATTACKS, AdversarialRobustness

__all__ = ["ATTACKS", "BASELINES", "METHODS", "AdversarialRobustness", "Attribution", "Explanation", "rank_correlation"]
