"""Explanations during training: Captum attributions of a fixed sample (``Attribution``) and an
adversarial robustness check with Captum's FGSM/PGD (``AdversarialRobustness``).

=================  ==========================================================================
module             concern
=================  ==========================================================================
``attribution``    the ``Attribution`` callback
``robustness``     the ``AdversarialRobustness`` callback
``arguments``      what ``Attribution`` refuses at construction
``keys``           the callbacks' declared logged metrics and report keys
``resolution``     what a pass explains: the inputs' modality, the targets, the baselines
``plan``           what a pass explains, checked before training (inputs, method, layer, baseline, target)
``inputs``         the attributed input, the others (``additional_forward_args``), the input embeddings
``compute``        one pass: Captum on the fixed sample (a classifier's scores or a causal LM's tokens)
``llm``            causal LMs: Captum's LLM attribution and a tokenizer over integer ids
``budgeting``      the overhead budget's final pass and the costly part of a pass
``explanation``    one pass's result: input-space attributions, feature names, files, drift
``methods``        Captum methods by name, their options, baselines, the chunked Captum calls
``sample``         the fixed, seeded, class-stratified sample
``schedule``       when a pass runs (validation epochs, fit end, test end); the callbacks' base
``progress``       progress in the Trainer's own progress bar style
``plots``          figures and HTML
=================  ==========================================================================
"""

from lightning_trust.explain.attribution import Attribution
from lightning_trust.explain.explanation import Explanation, rank_correlation
from lightning_trust.explain.methods import BASELINES, METHODS
from lightning_trust.explain.robustness import ATTACKS, AdversarialRobustness

__all__ = ["ATTACKS", "BASELINES", "METHODS", "AdversarialRobustness", "Attribution", "Explanation", "rank_correlation"]
