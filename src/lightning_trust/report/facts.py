"""The run's facts for the model card: model size and MACs, data sizes and groups, training setup."""

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

from lightning_trust.core.batch import BatchContract, BatchKeyError
from lightning_trust.core import isolated_eval, to_jsonable, unwrap_module

#: Distributions whose installed versions the card records (missing ones are left out).
PACKAGES: tuple[str, ...] = (
    "lightning-trust", "torch", "lightning", "torchmetrics", "opacus", "captum", "fairlearn", "torch-pruning",
    "torchao", "flwr", "scikit-learn", "numpy", "pandas",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "val", "test")
_MAX_GROUPS = 50  # a side column with more distinct values is an id, not a group


def model_facts(module: nn.Module, trainer: Any, example_input: Optional[Tensor]) -> dict[str, Any]:
    """Class, parameter counts, bytes and MACs (torch-pruning's counter, one sample) of ``module``."""
    inner = unwrap_module(module)
    params = list(inner.parameters())
    size = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in inner.buffers())
    facts: dict[str, Any] = {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "params": int(sum(p.numel() for p in params)),
        "trainable_params": int(sum(p.numel() for p in params if p.requires_grad)),
        "size_bytes": int(size),
        "macs": None,
        "input_shape": None,
    }
    if example_input is not None:
        facts["input_shape"] = [int(d) for d in example_input.shape]
        facts["macs"] = count_macs(module, trainer, example_input)
    hparams = getattr(module, "hparams", None)
    if hparams:
        facts["hyperparameters"] = _plain({k: v for k, v in dict(hparams).items() if not str(k).startswith("_")})
    return facts


def count_macs(module: nn.Module, trainer: Any, example_input: Tensor) -> Optional[int]:
    """MACs of one forward pass on ``example_input`` (one sample), with every pack callback paused."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_trust.compression.pruning import count_macs_params

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with isolated_eval(module, trainer, grad=False) as model:
            macs, _ = count_macs_params(model, example_input.to(device))
            if not macs:
                # the forward bypasses the modules' hooks (e.g. a QAT graph): count aten ops instead
                with FlopCounterMode(display=False) as counter:
                    model(example_input.to(device))
                macs = counter.get_total_flops() // 2
    except Exception:  # a model the counter cannot trace still gets a card
        return None
    return int(macs) if macs else None


def _dataset(datamodule: Any, trainer: Any, split: str) -> Optional[Dataset]:
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is not None:
        return dataset
    loader = {
        "train": lambda: trainer.train_dataloader,
        "val": lambda: trainer.val_dataloaders,
        "test": lambda: trainer.test_dataloaders,
    }[split]
    with contextlib.suppress(Exception):
        found = loader()
        if isinstance(found, (list, tuple)):
            found = found[0] if found else None
        return getattr(found, "dataset", None)
    return None


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
        return [torch.cat([b[i] for b in batches]) if isinstance(first[i], Tensor) else None for i in range(len(first))], n
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
        "datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}" if datamodule is not None else None,
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
        skip = {contract.input_key, contract.target_key, "x", "input", "inputs", "y", "target", "label", "labels"}
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
    """Epochs, steps, time, seed, hardware, package versions and the configuration of the run."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return {
        "epochs": int(trainer.current_epoch),
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
                    return _plain(loaded)
    config: dict[str, Any] = {}
    if getattr(module, "hparams", None):
        config["model"] = _plain(dict(module.hparams))
    if datamodule is not None and getattr(datamodule, "hparams", None):
        config["data"] = _plain(dict(datamodule.hparams))
    return config or None


def final_metrics(trainer: Any) -> dict[str, float]:
    """Scalar ``trainer.callback_metrics`` as plain floats, sorted by name."""
    metrics = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            metrics[name] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    return dict(sorted(metrics.items()))


def _plain(value: Any) -> Any:
    """JSON types only: tensors and numbers converted, anything else by its ``str``."""
    value = to_jsonable(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
