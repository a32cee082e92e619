"""The model card as a Hugging Face Hub ``README.md`` (``huggingface_hub.ModelCard`` / ``ModelCardData``).

The metadata: ``model-index`` evaluation results (:mod:`lightning_trust.report.hf_results`), the
data sets (Hub ids), the license, tags (``lightning-trust``, ``differential-privacy`` when the run
was private, ...) and the pipeline tag; the body: the standards table, the regulatory mapping and
every section's evidence (the card's Markdown). The metadata is checked here against the Hub's
model-card spec (:func:`check_hub_metadata`); nothing calls the Hub (``RepoCard.validate`` posts to
it and is never used).

Needs ``huggingface_hub`` (``pip install "lightning-trust[hub]"``; ``transformers`` brings it too).

Example:
    >>> check_license("apache-2.0")
    >>> check_license("apache2")
    Traceback (most recent call last):
    ...
    ValueError: license 'apache2' is not a Hugging Face Hub license id (close: apache-2.0). ...
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from lightning_trust.report.hf_results import dataset_identity, eval_results

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = ["HUB_LICENSES", "TASK_TYPES", "check_hub_metadata", "check_license", "hf_model_card", "task_type_of",
           "write_hf_card"]  # fmt: skip

README = "README.md"

#: License ids the Hub accepts in a card's ``license`` (huggingface/hub-docs, docs/hub/repositories-licenses.md).
HUB_LICENSES: frozenset[str] = frozenset({
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1",
    "lgpl-3.0", "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql",
    "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3",
    "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other"
})  # fmt: skip

#: Hub task ids a lightning-trust card can name (``--task-type``).
TASK_TYPES: frozenset[str] = frozenset({
    "tabular-classification", "tabular-regression", "image-classification", "text-classification",
    "token-classification", "text-generation", "fill-mask", "feature-extraction",
})  # fmt: skip

#: Tags for the sections a run reports.
_SECTION_TAGS = {
    "privacy": "differential-privacy", "privacy_audit": "privacy-audit", "fairness": "fairness",
    "fairness_mitigation": "fairness", "explain": "explainability", "evaluation": "domain-shift",
    "robustness": "adversarial-robustness", "compression": "pruning", "quantization": "quantization",
    "federated": "federated-learning", "uncertainty": "uncertainty-quantification",
}  # fmt: skip


def check_license(license: Optional[str], license_name: Optional[str] = None) -> None:
    """Raise ``ValueError`` unless ``license`` is a Hub license id (``other`` also needs ``license_name``)."""
    if license is None:
        return
    if license not in HUB_LICENSES:
        close = difflib.get_close_matches(str(license).lower(), sorted(HUB_LICENSES), n=3, cutoff=0.6)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(
            f"license {license!r} is not a Hugging Face Hub license id{hint}. Use one of the ids of "
            "https://huggingface.co/docs/hub/repositories-licenses (apache-2.0, mit, cc-by-4.0...), or 'other' "
            "with a license name (--license-name) and link (--license-link)."
        )
    if license == "other" and not license_name:
        raise ValueError(
            "license 'other' needs the license's name (--license-name) and, best, a link (--license-link)."
        )


def task_type_of(card: Mapping[str, Any]) -> str:
    """The Hub task of a classification card: ``image-`` (4-D inputs), ``text-`` (a vocabulary or a
    text datamodule) or ``tabular-classification`` (2-D inputs); ``ValueError`` when it cannot tell."""
    model, data = card.get("model") or {}, card.get("data") or {}
    if not any("class_counts" in s for s in (data.get("splits") or {}).values()):
        raise ValueError(
            "the card shows no class counts, so its task is not a classification one lightning-trust can name; "
            f"pass --task-type (one of {', '.join(sorted(TASK_TYPES))})."
        )
    shape = model.get("input_shape") or []
    hparams = model.get("hyperparameters") or {}
    textual = "vocab_size" in hparams or "text" in str(data.get("datamodule") or "").rsplit(".", 1)[-1].lower()
    if len(shape) == 4:
        return "image-classification"
    if textual:
        return "text-classification"
    if len(shape) == 2:
        return "tabular-classification"
    raise ValueError(f"cannot tell the task of inputs of shape {shape}; pass --task-type.")


def hf_model_card(
    card: Mapping[str, Any],
    *,
    license: Optional[str] = None,
    license_name: Optional[str] = None,
    license_link: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    model_name: Optional[str] = None,
    task_type: Optional[str] = None,
) -> ModelCard:
    """The Hub ``ModelCard`` of a lightning-trust card. ``license`` (else the card's) is required;
    ``datasets`` are Hub ids (else the card's ``data.datasets``); ``task_type`` defaults to
    :func:`task_type_of`. Raises ``ValueError`` naming what is missing or wrong."""
    from huggingface_hub import ModelCard, ModelCardData

    license = license or card.get("license")
    if not license:
        raise ValueError(
            "a Hugging Face card needs the model's license: pass --license <id> (e.g. apache-2.0; ids: "
            "https://huggingface.co/docs/hub/repositories-licenses) or set TrustReport(license=...)."
        )
    check_license(license, license_name)
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task type {task_type!r} is not one of {', '.join(sorted(TASK_TYPES))}.")
    task = task_type or task_type_of(card)
    hub_datasets = list(datasets or (card.get("data") or {}).get("datasets") or [])
    results = eval_results(card, task, hub_datasets[0] if hub_datasets else None)
    name = model_name or _slug(str(card["title"]))
    tags = ["lightning-trust", "pytorch-lightning", "model-card", task]
    tags += [_SECTION_TAGS[s] for s in card.get("sections", {}) if s in _SECTION_TAGS]
    data = ModelCardData(
        license=license, license_name=license_name, license_link=license_link,
        datasets=hub_datasets or None, model_name=name, eval_results=results or None,
        metrics=sorted({r.metric_type for r in results}) or None, pipeline_tag=task, tags=tags,
    )  # fmt: skip
    check_hub_metadata(data.to_dict())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(card, results and name)}")


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split()) or "model"


def _body(card: Mapping[str, Any], indexed: Any) -> str:
    from lightning_trust.report.render_markdown import render_markdown

    head, _, rest = render_markdown(card).partition("\n")
    dataset_type, _ = dataset_identity(card)
    note = (
        f"This card was written by lightning-trust from the run's `model_card.json` (schema {card['schema_version']}): "
        "every number below was measured in that run. "
        + (
            f"The `model-index` above holds the evaluation results on `{dataset_type}`, one result per domain "
            "and per group where the run measured them; each metric's name is the card's dotted name."
            if indexed
            else "The run logged no validation or test metric, so the card has no `model-index`."
        )
    )
    return f"{head}\n\n{note}\n{rest}"


def check_hub_metadata(meta: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` where ``ModelCardData.to_dict()`` breaks the Hub's model-card spec
    (license id, string lists, a ``model-index`` with task, dataset and finite numeric metrics)."""
    check_license(meta.get("license"), meta.get("license_name"))
    for key in ("tags", "datasets", "metrics"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) and v for v in meta[key])):
            raise ValueError(f"card metadata `{key}` must be a list of non-empty strings, got {meta[key]!r}.")
    index = meta.get("model-index")
    if index is None:
        return
    if not (isinstance(index, list) and len(index) == 1 and isinstance(index[0].get("name"), str)):
        raise ValueError("`model-index` must be one entry with the model's `name`.")
    for i, result in enumerate(index[0].get("results") or []):
        where = f"model-index results[{i}]"
        if not isinstance(result.get("task", {}).get("type"), str):
            raise ValueError(f"{where}: task.type is missing.")
        dataset = result.get("dataset", {})
        if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
            raise ValueError(f"{where}: dataset.type and dataset.name are required.")
        metrics = result.get("metrics") or []
        if not metrics:
            raise ValueError(f"{where}: no metrics.")
        for metric in metrics:
            value = metric.get("value")
            if (
                not isinstance(metric.get("type"), str)
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                raise ValueError(f"{where}: metric {metric!r} needs a type and a numeric value.")
            if not math.isfinite(value):
                raise ValueError(f"{where}: metric {metric.get('name')!r} is not finite ({value}).")


def write_hf_card(card: Mapping[str, Any], directory: Union[str, Path], **options: Any) -> Path:
    """Write ``README.md`` (:func:`hf_model_card` with ``options``) and the figures it links into ``directory``."""
    from lightning_trust.report.card import write_figures

    hub_card = hf_model_card(card, **options)
    directory = Path(directory)
    write_figures(card, directory)
    path = directory / README
    hub_card.save(path)
    return path
