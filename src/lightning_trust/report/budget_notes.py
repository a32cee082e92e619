"""Notes on standards judged on numbers an overhead budget measured on part of the data.

A callback that sizes its final pass to its budget (:class:`~lightning_trust.core.OverheadBudget`)
says so in its section: ``truncated`` with ``samples`` of ``samples_available`` (adversarial
robustness), ``extra_samples.truncated`` (the corruption suite and extra domains of a cross-domain
evaluation) or ``aggregated_over`` ``{samples, of, numbers}`` (attributions). A standard on such a
number is still judged (it is a measured number), and its card entry carries a ``note`` saying on
how many samples it stands, so the verdict is never read as one on the whole set.

Example:
    >>> sections = {"robustness": {"truncated": True, "samples": 127, "samples_available": 256, "robust_accuracy": {}}}
    >>> budget_note(sections, "robustness.robust_accuracy.fgsm.0.1")
    'measured on 127 of 256 samples: the overhead budget cut the final pass (max_overhead=None measures all)'
    >>> budget_note(sections, "fairness.demographic_parity_difference") is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

__all__ = ["budget_note"]

_SUFFIX = "the overhead budget cut the final pass (max_overhead=None measures all)"


def _counted(samples: Any, available: Any) -> str:
    if isinstance(samples, int) and isinstance(available, int):
        return f"measured on {samples} of {available} samples: {_SUFFIX}"
    return f"measured on part of the samples: {_SUFFIX}"


def budget_note(sections: Mapping[str, Any], name: str) -> Optional[str]:
    """The note for the standard ``name`` (``section.key...``), or ``None`` when its number stands on all samples."""
    section_name, _, rest = name.partition(".")
    section = sections.get(section_name)
    if not isinstance(section, Mapping) or not rest:
        return None
    if section.get("truncated") is True:
        return _counted(section.get("samples"), section.get("samples_available"))
    extra = section.get("extra_samples")
    if isinstance(extra, Mapping) and extra.get("truncated") is True:
        cut = [
            f"{source} {part['samples']} of {part['samples_available']}"
            for source, part in _parts(extra)
            if part.get("truncated") is True and part.get("samples_available") is not None
        ]
        detail = "; ".join(cut) if cut else f"{extra.get('samples')} samples"
        return (
            f"the section's corrupted copies and extra domains were measured on part of the data ({detail}): {_SUFFIX}"
        )
    over = section.get("aggregated_over")
    if not isinstance(over, Mapping) or not all(isinstance(over.get(k), int) for k in ("samples", "of")):
        return None
    if over["samples"] < over["of"] and rest.split(".", 1)[0] in set(over.get("numbers") or ()):
        return _counted(over["samples"], over["of"])
    return None


def _parts(extra: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    parts: list[tuple[str, Mapping[str, Any]]] = []
    corruptions = extra.get("corruptions")
    if isinstance(corruptions, Mapping):
        parts.append(("corruptions", corruptions))
    domains = extra.get("domains")
    if isinstance(domains, Mapping):
        parts += [(f"domain {name}", part) for name, part in domains.items() if isinstance(part, Mapping)]
    return parts
