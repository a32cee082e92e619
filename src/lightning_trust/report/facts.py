"""The run's facts for the model card: model size and MACs, data sizes and groups, training setup.

Example:
    >>> import torch
    >>> facts = model_facts(torch.nn.Linear(3, 2), None, torch.ones(1, 3))
    >>> facts["params"], facts["macs"], facts["input_shape"]
    (8, 8, [1, 3])
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_trust.core.batch import DEFAULT_INPUT_KEYS, DEFAULT_TARGET_KEYS, BatchContract, BatchKeyError
from lightning_trust.core.loaders import first_loader, split_loaders
from lightning_trust.core.macs import count_macs
from lightning_trust.core.passes import unwrap_module
from lightning_trust.core.seam import trained_epoch
from lightning_trust.core.tensors import first_tensor, to_jsonable

__all__ = [
    "PACKAGES",
    "SPLITS",
    "data_facts",
    "final_metrics",
    "hardware",
    "model_facts",
    "package_versions",
    "run_config",
    "training_facts",
]

#: Distributions whose installed versions the card records (missing ones are left out).
PACKAGES: tuple[str, ...] = (
    "lightning-trust", "torch", "lightning", "torchmetrics", "opacus", "captum", "fairlearn", "torch-pruning",
    "torchao", "flwr", "scikit-learn", "numpy", "pandas",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "val", "test")
_MAX_GROUPS = 50  # a side column with more distinct values is an id, not a group


def model_facts(module: nn.Module, trainer: Any, example_input: Any) -> dict[str, Any]:
    """Class, parameter counts, bytes and MACs (:func:`lightning_trust.core.macs.count_macs`, one
    sample) of ``module``. ``example_input`` is one sample's inputs: a tensor, or a dict of model
    keyword arguments (its first tensor gives the input shape)."""
    inner = unwrap_module(module)
    params = list(inner.parameters())
    size = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for b in inner.buffers()
    )
    facts: dict[str, Any] = {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "params": int(sum(p.numel() for p in params)),
        "trainable_params": int(sum(p.numel() for p in params if p.requires_grad)),
        "size_bytes": int(size),
        "macs": None,
        "input_shape": None,
    }
    first = first_tensor(example_input)
    if first is not None:
        facts["input_shape"] = [int(d) for d in first.shape]
        facts["macs"] = count_macs(module, trainer, example_input)
    hparams = getattr(module, "hparams", None)
    if hparams:
        facts["hyperparameters"] = to_jsonable(
            {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}, strict=True
        )
    return facts


def _dataset(datamodule: Any, trainer: Any, split: str) -> Optional[Dataset]:
    """The datamodule's ``<split>_dataset``, else the dataset of the split's first loader (the user's
    own under a wrapper that adds training samples, such as a privacy audit's canaries)."""
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is not None:
        return dataset
    loader = first_loader(split_loaders(trainer, split))
    dataset = getattr(loader, "dataset", None)
    return getattr(dataset, "original_dataset", dataset)


def _whole(dataset: Dataset, limit: int) -> tuple[Any, int]:
    """The dataset as one batch: its tensors when it holds them, else collated from up to ``limit`` samples."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (Mapping, tuple, list)) and tensors:
        return tensors, len(dataset)  # type: ignore[arg-type]
    n = min(len(dataset), limit)  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=1024, shuffle=False)
    batches = list(loader)
    if not batches:
        return None, 0
    first = batches[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([b[k] for b in batches]) for k in first if isinstance(first[k], Tensor)}, n
    if isinstance(first, (tuple, list)):
        return [
            torch.cat([b[i] for b in batches]) if isinstance(first[i], Tensor) else None for i in range(len(first))
        ], n
    return None, n


def _names(labels: list[int], names: Optional[list[str]]) -> list[str]:
    return [names[i] if names is not None and 0 <= i < len(names) else str(i) for i in labels]


def _counts(column: Any, names: Optional[list[str]]) -> Optional[dict[str, int]]:
    if not isinstance(column, Tensor) or column.ndim != 1 or column.is_floating_point() or column.numel() == 0:
        return None
    values, counts = torch.unique(column.cpu(), return_counts=True)
    if len(values) > _MAX_GROUPS:
        return None
    return dict(zip(_names(values.tolist(), names), (int(c) for c in counts)))


def data_facts(
    datamodule: Any,
    trainer: Any,
    contract: BatchContract,
    sensitive_features: Optional[list[str]],
    domain_key: Optional[str],
    max_samples: int,
) -> dict[str, Any]:
    """Sizes and class balance per split; group sizes of the side columns in the training split."""
    class_names = getattr(datamodule, "class_names", None)
    categories = getattr(datamodule, "categories", None) or {}
    facts: dict[str, Any] = {
        "datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
        if datamodule is not None
        else None,
        "splits": {},
        "groups": {},
    }
    for split in SPLITS:
        dataset = _dataset(datamodule, trainer, split)
        if dataset is None:
            continue
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            continue  # an iterable dataset has no size to report
        entry: dict[str, Any] = {"size": int(size)}
        whole, counted = _whole(dataset, max_samples)
        target = None
        if whole is not None:
            with contextlib.suppress(BatchKeyError):
                target = contract.target(whole)
        counts = _counts(target, class_names)
        if counts:
            total = sum(counts.values())
            entry["class_counts"] = counts
            entry["class_balance"] = {k: v / total for k, v in counts.items()}
            if counted < size:
                entry["counted_samples"] = counted
        facts["splits"][split] = entry
        if split == "train" and whole is not None:
            facts["groups"] = _groups(whole, contract, categories, sensitive_features, domain_key)
    return facts


def _groups(
    whole: Any, contract: BatchContract, categories: Mapping[str, Any],
    sensitive_features: Optional[list[str]], domain_key: Optional[str],
) -> dict[str, Any]:  # fmt: skip
    named = list(sensitive_features or []) + ([domain_key] if domain_key else [])
    if named:
        columns = named
    elif isinstance(whole, Mapping):  # no names given: every side column of a dict dataset
        skip = {contract.input_key, contract.target_key, *DEFAULT_INPUT_KEYS, *DEFAULT_TARGET_KEYS}
        columns = [k for k in whole if k not in skip] + [k for k in contract.columns if k not in whole]
    else:
        columns = list(contract.columns)
    groups: dict[str, Any] = {}
    for name in columns:
        try:
            column = contract.side(whole, name)
        except BatchKeyError:
            if name in named:
                raise
            continue
        counts = _counts(column, categories.get(name))
        if counts is None:
            continue
        role = "domain" if name == domain_key else "sensitive" if name in (sensitive_features or []) else "side"
        groups[name] = {"role": role, "counts": counts}
    return groups


def training_facts(trainer: Any, duration_s: float, config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Epochs, steps, time, seed, hardware, package versions and the configuration of the run.

    ``epochs`` counts the epochs completed; ``final_epoch`` is the index of the last one trained, the
    epoch every section's ``epoch`` names (:func:`~lightning_trust.core.seam.trained_epoch`)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return {
        "epochs": int(trainer.current_epoch),
        "final_epoch": trained_epoch(trainer),
        "global_steps": int(trainer.global_step),
        "duration_s": round(float(duration_s), 3),
        "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
        "hardware": hardware(trainer),
        "packages": package_versions(),
        "config": config,
    }


def hardware(trainer: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": type(trainer.accelerator).__name__,
        "devices": int(trainer.num_devices),
        "num_nodes": int(trainer.num_nodes),
        "strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
    }
    if torch.cuda.is_available():
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return facts


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def run_config(trainer: Any, module: nn.Module, datamodule: Any) -> Optional[dict[str, Any]]:
    """The LightningCLI configuration when run from the CLI, else the module's and datamodule's hparams."""
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            with contextlib.suppress(Exception):
                import yaml

                dumped = callback.parser.dump(callback.config, skip_none=False, skip_check=True)
                loaded = yaml.safe_load(dumped)
                if isinstance(loaded, dict):
                    return to_jsonable(loaded, strict=True)
    config: dict[str, Any] = {}
    hparams = getattr(module, "hparams", None)
    if hparams:
        config["model"] = to_jsonable(dict(hparams), strict=True)
    if datamodule is not None and getattr(datamodule, "hparams", None):
        config["data"] = to_jsonable(dict(datamodule.hparams), strict=True)
    return config or None


def final_metrics(trainer: Any) -> dict[str, float]:
    """Scalar ``trainer.callback_metrics`` as plain floats (NaN kept: the card writes it as null), sorted by name."""
    metrics = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            metrics[name] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    return dict(sorted(metrics.items()))
