"""lightning-trust: drop-in Lightning callbacks for private, federated, explainable, fair, compact and
cross-domain-evaluated training, and one report that says whether a model meets declared standards.

Example:
    >>> from lightning_trust.demo import AdultDataModule, TabularMLP
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(max_epochs=1, callbacks=[...])  # our callbacks here
"""

from lightning_trust.batch import BatchContract, BatchKeyError
from lightning_trust.protocol import Pausable, Reportable, collect_reports

__version__ = "0.1.0"

__all__ = ["BatchContract", "BatchKeyError", "Pausable", "Reportable", "__version__", "collect_reports"]
