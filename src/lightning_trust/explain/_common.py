"""Pieces both explain callbacks share: the fixed seeded sample, when to run, progress, logging."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_trust.core.batch import BatchContract
from lightning_trust.core import artifact_dir

#: When a callback runs: at the end of each validation epoch, once at the end of fit, or after testing.
STAGES: tuple[str, ...] = ("validation_end", "fit_end", "test_end")


@dataclass
class FixedSample:
    """Samples drawn once: ``inputs`` and (when the batch has one) ``targets``, with their dataset indices."""

    inputs: Tensor
    targets: Optional[Tensor]
    indices: list[int]
    source: str

    def state(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "targets": self.targets, "indices": list(self.indices), "source": self.source}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FixedSample:
        return cls(state["inputs"], state.get("targets"), list(state["indices"]), state.get("source", "val"))


def validate_stages(run_on: Union[str, Sequence[str]]) -> tuple[str, ...]:
    stages = (run_on,) if isinstance(run_on, str) else tuple(run_on)
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise ValueError(f"`run_on` must be one or more of {list(STAGES)}, got {run_on!r}.")
    return stages


def first_loader(loaders: Any) -> Optional[DataLoader]:
    """The first DataLoader of what a Trainer/DataModule returns (a loader, a list or a dict of them)."""
    if loaders is None:
        return None
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for loader in loaders:
            found = first_loader(loader)
            if found is not None:
                return found
    return None


def find_loader(trainer: Any, kinds: Sequence[str]) -> tuple[Optional[DataLoader], str]:
    """The user's DataLoader for the first of ``kinds`` ("train", "val", "test") that exists."""
    datamodule = getattr(trainer, "datamodule", None)
    for kind in kinds:
        attr = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders"}[kind]
        loader = first_loader(getattr(trainer, attr, None))
        if loader is None and datamodule is not None:
            method = getattr(datamodule, f"{kind}_dataloader", None)
            if callable(method):
                try:
                    loader = first_loader(method())
                except (NotImplementedError, TypeError, AttributeError, RuntimeError):  # datamodule lacks that split
                    loader = None
        if loader is not None:
            return loader, kind
    return None, ""


def _collated(loader: DataLoader, indices: Sequence[int]) -> Iterator[Any]:
    """Batches of ``loader.dataset[indices]`` collated like the user's loader (no shuffling)."""
    sub = DataLoader(Subset(loader.dataset, list(indices)), batch_size=512, shuffle=False, collate_fn=loader.collate_fn)
    yield from sub


def _read(batches: Any, contract: BatchContract, limit: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    inputs: list[Tensor] = []
    targets: list[Tensor] = []
    has_target = True
    count = 0
    for batch in batches:
        x = contract.inputs(batch)
        if not isinstance(x, Tensor):
            raise TypeError(
                f"The explain callbacks need a single input tensor per batch, got {type(x).__name__}; point "
                "`batch_keys: {input: <key>}` at the model's input tensor."
            )
        inputs.append(x.detach().cpu())
        if has_target and contract.has_target(batch) and isinstance(contract.target(batch), Tensor):
            targets.append(contract.target(batch).detach().cpu())
        else:
            has_target = False
        count += len(x)
        if limit is not None and count >= limit:
            break
    if not inputs:
        raise ValueError("The data to explain is empty.")
    x = torch.cat(inputs)
    y = torch.cat(targets) if has_target and targets else None
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    return x, y


def stratified_indices(
    targets: Optional[Tensor], num: int, generator: np.random.Generator, size: Optional[int] = None
) -> np.ndarray:
    """``num`` of ``size`` positions, balanced over classes (round-robin over a seeded shuffle of each
    class) when ``targets`` are integer class labels; a seeded random choice otherwise. Sorted by class."""
    n = len(targets) if targets is not None else int(size or 0)
    if targets is None or targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
        return np.sort(generator.choice(n, size=min(num, n), replace=False)) if n else np.arange(0)
    labels = targets.numpy()
    classes = np.unique(labels)
    queues = [list(generator.permutation(np.flatnonzero(labels == c))) for c in classes]
    chosen: list[int] = []
    while len(chosen) < min(num, n):
        for queue in queues:
            if queue and len(chosen) < num:
                chosen.append(int(queue.pop(0)))
    chosen_arr = np.array(chosen, dtype=np.int64)
    return chosen_arr[np.lexsort((chosen_arr, labels[chosen_arr]))]


def draw_sample(
    loader: DataLoader,
    contract: BatchContract,
    num_samples: int,
    seed: int,
    stratify: bool = True,
    pool_size: int = 4096,
    source: str = "val",
) -> FixedSample:
    """Draw ``num_samples`` fixed samples from ``loader``'s dataset through the batch contract.

    A map-style dataset is read at a seeded pool of at most ``pool_size`` positions (the loader's own
    sampler, shuffling or DDP sharding play no part, so every rank and every run draws the same);
    an iterable dataset gives its first ``pool_size`` samples. Within the pool the sample is
    stratified by class when the batch has integer class targets.
    """
    generator = np.random.default_rng(seed)
    dataset = loader.dataset
    # iterating a DataLoader draws its base seed from torch's global RNG: fork it, so that drawing the
    # sample leaves no trace on training (DP noise, dropout, shuffling)
    with torch.random.fork_rng(devices=[]):
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            x, y = _read(loader, contract, limit=pool_size)
            pool = np.arange(len(x))
        else:
            n = len(dataset)  # type: ignore[arg-type]
            if n == 0:
                raise ValueError(f"The {source} dataset is empty: there is nothing to explain.")
            pool = np.sort(generator.choice(n, size=min(n, pool_size), replace=False))
            x, y = _read(_collated(loader, pool.tolist()), contract)
    picked = stratified_indices(y if stratify else None, num_samples, generator, size=len(x))
    index = torch.as_tensor(picked, dtype=torch.long)
    return FixedSample(
        inputs=x[index].contiguous(),
        targets=y[index].contiguous() if y is not None else None,
        indices=[int(pool[i]) for i in picked],
        source=source,
    )


def should_run(trainer: Any, every_n_epochs: int) -> bool:
    """Every ``every_n_epochs``-th epoch during fit; always in a standalone ``trainer.validate``."""
    standalone = getattr(getattr(getattr(trainer, "state", None), "fn", None), "value", None) == "validate"
    return standalone or (trainer.current_epoch + 1) % every_n_epochs == 0


def log_metrics(trainer: Any, pl_module: Any, metrics: dict[str, float], hook_allows_log: bool) -> None:
    """Log plain floats: through ``pl_module.log`` (rank zero only, so no sync can deadlock) inside
    hooks that allow it, straight to ``trainer.loggers`` elsewhere (``on_fit_end``)."""
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    if not metrics:
        return
    if hook_allows_log:
        for name, value in metrics.items():
            pl_module.log(name, value, rank_zero_only=True, on_step=False, on_epoch=True, sync_dist=False)
        return
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)


class Progress:
    """Progress of a long explanation in the Trainer's own bar style: a task in the
    :class:`~lightning.pytorch.callbacks.RichProgressBar`, a transient tqdm bar with the TQDM bar,
    nothing when the Trainer shows no progress bar (or off rank zero)."""

    def __init__(self, trainer: Any, total: int, description: str, enabled: bool = True) -> None:
        self.total = total
        self._rich: Any = None
        self._task: Any = None
        self._tqdm: Any = None
        bar = getattr(trainer, "progress_bar_callback", None)
        if not enabled or bar is None or not getattr(trainer, "is_global_zero", True) or total <= 1:
            return
        if not getattr(bar, "is_enabled", True):
            return
        if type(bar).__name__ == "RichProgressBar" and getattr(bar, "progress", None) is not None:
            self._rich = bar.progress
            self._task = self._rich.add_task(description, total=total)
        elif type(bar).__name__ == "TQDMProgressBar":
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            self._tqdm = Tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stdout)

    def advance(self, n: int = 1) -> None:
        if self._rich is not None:
            self._rich.update(self._task, advance=n)
        elif self._tqdm is not None:
            self._tqdm.update(n)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.remove_task(self._task)
        elif self._tqdm is not None:
            self._tqdm.close()


@contextmanager
def progress(trainer: Any, total: int, description: str, enabled: bool = True) -> Iterator[Progress]:
    bar = Progress(trainer, total, description, enabled)
    try:
        yield bar
    finally:
        bar.close()


def eps_name(eps: float) -> str:
    """ε as written in report keys and metric names: ``0.1``, ``0``, ``0.03``."""
    return f"{float(eps):g}"


class ScheduledPass(Callback):
    """Base of the explain callbacks: runs :meth:`_run` on rank zero at the configured ``stages``
    (each validation epoch that ``every_n_epochs`` selects, fit end, test end), once per trigger."""

    area: str = ""

    def _init_schedule(self, run_on: Union[str, Sequence[str]], every_n_epochs: int) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        self.stages = validate_stages(run_on)
        self.every_n_epochs = every_n_epochs
        self._done: set[tuple[str, int, int]] = set()
        self._folder: Optional[Any] = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # On every rank: `trainer.log_dir` broadcasts, so rank zero alone must never ask for it later.
        self._folder = artifact_dir(trainer, self.area)

    def folder(self, trainer: Any) -> Any:
        return self._folder if self._folder is not None else artifact_dir(trainer, self.area)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "validation_end" in self.stages and not trainer.sanity_checking and should_run(trainer, self.every_n_epochs):
            self._trigger(trainer, pl_module, "validation_end", hook_allows_log=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if "fit_end" in self.stages:
            self._trigger(trainer, pl_module, "fit_end", hook_allows_log=False)

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if "test_end" in self.stages:
            self._trigger(trainer, pl_module, "test_end", hook_allows_log=True)

    def _trigger(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        key = (stage, trainer.current_epoch, trainer.global_step)
        if key in self._done:
            return  # several validation runs in one epoch (val_check_interval) count once
        self._done.add(key)
        if trainer.is_global_zero:  # rank zero works; the others carry on (no collective call is made)
            self._run(trainer, pl_module, stage, hook_allows_log)

    def _run(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        raise NotImplementedError
