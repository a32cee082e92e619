"""lightning_trust.privacy: DP-SGD for any LightningModule (Opacus).

==============  ================================================================================
module          concern
==============  ================================================================================
``callback``    the :class:`DifferentialPrivacy` callback: arguments, Lightning hooks, policy
``accounting``  sample rate, planned steps, noise for a target ε, ε spent, the budget (no Trainer)
``hooks``       Opacus's per-sample-gradient hooks: attach, detach, pause, re-attach, ghost clipping
``loader``      the Poisson-sampled train loader, installed through the seam
``optimizer``   the user's optimizer in Opacus's ``DPOptimizer``
``samplers``    batch samplers in front of the dataset (distributed Poisson, virtual batches)
==============  ================================================================================

Example:
    >>> from lightning_trust.privacy import DifferentialPrivacy
    >>> dp = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)
    >>> dp.report_name
    'privacy'
"""

from lightning_trust.privacy.callback import DifferentialPrivacy

__all__ = ["DifferentialPrivacy"]
