"""The small protocol every pack callback shares with the report, and with each other.

* **Report**: a callback with a ``report_section`` (``"privacy"``, ``"federated"``, ``"explain"``,
  ``"robustness"``, ``"fairness"``, ``"compression"``, ``"evaluation"``) and a ``report()`` method
  returning a JSON-serializable dict. Numbers in it are addressable by dotted names
  (``privacy.epsilon``, ``evaluation.ood_gap.accuracy``) for declared standards. Pictures go under
  the reserved key ``"figures"`` as ``{name: path to a PNG}``. The report knows nothing else.
* **Pausing**: a callback that changes how the module runs forward/backward during training (DP
  per-sample-gradient hooks, say) exposes ``paused()``, a context manager under which the module
  behaves like the plain user module. Callbacks that run extra passes outside training use
  :func:`lightning_trust.utils.isolated_eval`, which enters all of them.

Example:
    >>> class MyCheck(Callback):
    ...     report_section = "mycheck"
    ...     def report(self) -> dict:
    ...         return {"score": 0.93, "figures": {"curve": "/tmp/curve.png"}}
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

FIGURES_KEY = "figures"


@runtime_checkable
class Reportable(Protocol):
    """A callback that contributes a section to the standards report."""

    report_section: str

    def report(self) -> dict[str, Any]: ...


@runtime_checkable
class Pausable(Protocol):
    """A callback whose training-time changes to the module can be paused for extra passes."""

    def paused(self) -> AbstractContextManager[Any]: ...


def reportable_callbacks(trainer: Any) -> list[Reportable]:
    """The Trainer's callbacks that follow the report protocol, in Trainer order."""
    return [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, Reportable)]


def collect_reports(trainer: Any) -> dict[str, Any]:
    """``{section: report()}`` of every reporting callback; two callbacks of one section are numbered."""
    sections: dict[str, Any] = {}
    for callback in reportable_callbacks(trainer):
        name = callback.report_section
        if name in sections:
            index = 2
            while f"{name}_{index}" in sections:
                index += 1
            name = f"{name}_{index}"
        sections[name] = callback.report()
    return sections
