"""The base every pack callback shares: declared capabilities, a stable report name, one
compatibility check at ``setup``, warnings once per run.

Example:
    >>> from lightning_trust.core.compat import Capability
    >>> class Probe(TrustCallback):
    ...     report_section = "probe"
    ...     capabilities = frozenset({Capability.EXTRA_PASSES})
    ...     def report(self) -> dict:
    ...         return {"ok": 1.0}
    >>> Probe(name="probe_val").name
    'probe_val'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_trust.core.compat import Capability, check_compatibility
from lightning_trust.core.output import reset_warnings

__all__ = ["TrustCallback", "validate_name"]


def validate_name(name: Optional[str]) -> Optional[str]:
    """A user-given report section name: a non-empty identifier-like string without dots."""
    if name is None:
        return None
    if not isinstance(name, str) or not name or "." in name or not name.replace("_", "a").replace("-", "a").isalnum():
        raise ValueError(
            f"`name` must be a short identifier (letters, digits, '_' or '-', no dots), got {name!r}: it is the "
            "report section under which standards address this callback's numbers."
        )
    return name


class TrustCallback(Callback):
    """A Lightning callback of the pack.

    Subclasses declare ``capabilities`` (what they do to training) and ``refuses`` (capabilities
    of other callbacks they cannot train beside: ``{capability: "why; the fix"}``); either may be
    a property when it depends on the arguments. ``setup`` runs the one compatibility check of
    :mod:`lightning_trust.core.compat` and starts a new run of warn-once conditions; subclasses
    that override ``setup`` call ``super().setup(...)`` first.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    refuses: ClassVar[Mapping[Capability, str]] = {}

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = validate_name(name)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        reset_warnings(self)
        check_compatibility(trainer, fitting=stage == TrainerFn.FITTING)

    @property
    def report_name(self) -> str:
        """The report section this callback writes: its ``name``, else its ``report_section``."""
        return self.name or str(getattr(self, "report_section", type(self).__name__.lower()))
