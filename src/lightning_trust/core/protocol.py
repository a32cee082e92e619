"""The small protocol every pack callback shares with the report, and with each other.

* **Report**: a callback with a ``report_section`` (one of :data:`SECTIONS`) and a ``report()``
  method returning a JSON-serializable dict. Numbers in it are addressable by dotted names
  (``privacy.epsilon``, ``evaluation.ood_gap.accuracy``) for declared standards. Pictures go under
  the reserved key ``"figures"`` as ``{name: path to a PNG}``. The report knows nothing else.
  A section's name does not depend on callback order: it is the callback's ``name`` when the user
  gives one, else its ``report_section``; two callbacks that would share a name are refused
  (:func:`section_names`), so ``fairness.dpd`` always means the same callback.
* **Pausing**: a callback that changes how the module runs forward/backward during training (DP
  per-sample-gradient hooks, say) exposes ``paused()``, a context manager under which the module
  behaves like the plain user module. Callbacks that run extra passes outside training use
  :func:`lightning_trust.core.passes.isolated_eval`, which enters all of them.

Example:
    >>> from lightning.pytorch.callbacks import Callback
    >>> class MyCheck(Callback):
    ...     report_section = "mycheck"
    ...     def report(self) -> dict:
    ...         return {"score": 0.93, "figures": {"curve": "/tmp/curve.png"}}
    >>> isinstance(MyCheck(), Reportable), report_name(MyCheck())
    (True, 'mycheck')
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "FIGURES_KEY",
    "SECTIONS",
    "DuplicateSectionError",
    "Pausable",
    "Reportable",
    "collect_reports",
    "report_name",
    "reportable_callbacks",
    "section_names",
]

FIGURES_KEY = "figures"

#: The sections the pack's callbacks write, by the callback that writes them.
SECTIONS: dict[str, str] = {
    "privacy": "DifferentialPrivacy: ε, δ, noise, clipping, sampling, accountant",
    "federated": "FederatedSimulation / FederatedStrategy: rounds, clients, aggregation, client-level DP",
    "explain": "Attribution: feature/token/pixel attributions, faithfulness, stability",
    "robustness": "AdversarialRobustness: accuracy under FGSM/PGD per ε, minimal perturbations",
    "fairness": "FairnessMetrics: per-group metrics, disparities, intervals",
    "fairness_mitigation": "FairnessPenalty / ThresholdOptimizer: the mitigation and its effect",
    "compression": "ProgressivePruning: schedule, measured shapes, MACs, latency, accuracy",
    "quantization": "QuantizationAwareTraining: int8 export, size, latency, agreement",
    "evaluation": "CrossDomainEvaluation: per-domain metrics, OOD gap, calibration, corruptions",
}


class DuplicateSectionError(ValueError):
    """Two reporting callbacks would write the same report section."""


@runtime_checkable
class Reportable(Protocol):
    """A callback that contributes a section to the standards report."""

    report_section: str

    def report(self) -> dict[str, Any]: ...


@runtime_checkable
class Pausable(Protocol):
    """A callback whose training-time changes to the module can be paused for extra passes."""

    def paused(self) -> AbstractContextManager[Any]: ...


def report_name(callback: Reportable) -> str:
    """The section a callback writes: its user-given ``name``, else its ``report_section``."""
    name = getattr(callback, "name", None)
    return str(name) if name else callback.report_section


def reportable_callbacks(trainer: Any) -> list[Reportable]:
    """The Trainer's callbacks that follow the report protocol, in Trainer order."""
    return [cb for cb in getattr(trainer, "callbacks", []) or [] if isinstance(cb, Reportable)]


def section_names(trainer: Any) -> dict[str, Reportable]:
    """``{section name: callback}``; refuses two callbacks that would write the same section."""
    sections: dict[str, Reportable] = {}
    for callback in reportable_callbacks(trainer):
        name = report_name(callback)
        if name in sections:
            raise DuplicateSectionError(
                f"{type(sections[name]).__name__} and {type(callback).__name__} would both write the report "
                f"section {name!r}. Give each a distinct `name` (e.g. `name: {name}_by_age`), so that standards "
                f"such as `{name}.<metric>` keep pointing at the same callback whatever the callback order."
            )
        sections[name] = callback
    return sections


def collect_reports(trainer: Any) -> dict[str, Any]:
    """``{section: report()}`` of every reporting callback (see :func:`section_names`)."""
    return {name: callback.report() for name, callback in section_names(trainer).items()}
