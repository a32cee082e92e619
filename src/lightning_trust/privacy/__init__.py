"""lightning_trust.privacy: DP-SGD for any LightningModule (Opacus).

Example:
    >>> from lightning_trust.privacy import DifferentialPrivacy
    >>> dp = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)
"""

from lightning_trust.privacy.callback import DifferentialPrivacy

__all__ = ["DifferentialPrivacy"]
