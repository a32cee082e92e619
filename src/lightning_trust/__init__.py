"""lightning-trust: drop-in Lightning callbacks for private, federated, explainable, fair, compact and
cross-domain-evaluated training, and one report that says whether a model meets declared standards.

Example:
    >>> from lightning_trust import BatchContract
    >>> BatchContract.from_keys({"input_keys": ["input_ids", "attention_mask"]}).input_keys
    ('input_ids', 'attention_mask')
"""

from lightning_trust.core import (
    BatchContract,
    BatchKeyError,
    Capability,
    IncompatibleCallbacksError,
    Pausable,
    Reportable,
    collect_reports,
)

__version__ = "0.1.0"

__all__ = [
    "BatchContract",
    "BatchKeyError",
    "Capability",
    "IncompatibleCallbacksError",
    "Pausable",
    "Reportable",
    "__version__",
    "collect_reports",
]
