"""Helpers both compression callbacks share: example inputs, checkpoint peeking, DDP re-wrapping,
CPU latency, accuracy and agreement over a dataloader."""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from lightning_trust.core.batch import BatchContract

#: Name under which QuantizationAwareTraining registers the fake-quantized graph on the LightningModule.
QAT_ATTR = "lightning_trust_qat"
#: Samples kept as the example input in checkpoints: enough to trace, small enough to store.
EXAMPLE_ROWS = 4


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nested tensor / dict / list / tuple."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def first_tensor(value: Any) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def example_from(inputs: Any, rows: int = EXAMPLE_ROWS, private: bool = False) -> Any:
    """A few detached CPU rows of a batch's inputs, to store and to trace with.

    ``private=True`` keeps only shapes and dtypes (zeros): under differential privacy no training
    record may be stored in the checkpoint next to the DP model.
    """
    if private:
        return map_tensors(inputs, lambda t: torch.zeros((rows, *t.shape[1:]) if t.ndim else (), dtype=t.dtype))
    return map_tensors(inputs, lambda t: t[:rows].detach().cpu().clone())


def example_from_spec(spec: Any) -> Any:
    """An ``example_input`` argument as a tensor: a tensor is kept, a shape list becomes zeros."""
    if spec is None or isinstance(spec, (Tensor, Mapping, tuple)):
        return spec
    if isinstance(spec, list) and all(isinstance(s, int) and s > 0 for s in spec):
        return torch.zeros(*spec)
    raise ValueError(
        f"`example_input` must be a tensor or a shape (list of positive ints, e.g. [1, 1, 8, 8]), got {spec!r}."
    )


def repeat_rows(example: Any, batch_size: int) -> Any:
    """``example`` tiled along the batch dimension to ``batch_size`` rows (for latency measurements)."""

    def tile(t: Tensor) -> Tensor:
        reps = -(-batch_size // t.shape[0])
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch_size].contiguous()

    return map_tensors(example, tile)


def as_args(inputs: Any) -> tuple[Any, ...]:
    return (inputs,)


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    return model(inputs)


def peek_checkpoint(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """Read a checkpoint before Lightning restores it (the structure must be rebuilt before the weights load).

    Tries ``weights_only=True`` first; a checkpoint holding other pickled objects is read the way
    Lightning itself reads it right after.
    """
    path = str(path)
    if not Path(path).exists():
        return None  # remote or "best"/"last" aliases are resolved by Lightning before setup; unknown: skip
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        from lightning.fabric.utilities.cloud_io import _load as pl_load

        return pl_load(path, map_location="cpu")


def callback_state(checkpoint: Mapping[str, Any], cls_name: str, state_key: str) -> Optional[dict[str, Any]]:
    """A callback's saved state: by its exact ``state_key``, else the only state of that callback class."""
    states = checkpoint.get("callbacks") or {}
    if state_key in states:
        return states[state_key]
    matches = [v for k, v in states.items() if str(k).split("{", 1)[0] == cls_name]
    return matches[0] if len(matches) == 1 else None


def rewrap_ddp(trainer: Any) -> None:
    """Re-wrap the module in DDP after its parameters or buffers were replaced.

    DDP builds its gradient buckets and buffer list when it wraps the module; after pruning (new
    ``Parameter`` objects) or after inserting fake-quant observers it must wrap again, or gradients
    of the new parameters are never all-reduced.
    """
    from lightning.pytorch.strategies import DDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, nn.parallel.DistributedDataParallel):
        return
    strategy.model = strategy._setup_model(strategy.lightning_module)
    strategy._register_ddp_hooks()


def measure_latency(model: Callable[..., Any], inputs: Any, min_run_time: float = 0.3) -> float:
    """Median seconds per call of ``model(inputs)`` on CPU under ``torch.no_grad()`` (torch.utils.benchmark)."""
    from torch.utils.benchmark import Timer

    with torch.no_grad():
        for _ in range(3):  # warm-up (and compilation, for compiled models)
            model(inputs)
        timer = Timer(stmt="model(inputs)", globals={"model": model, "inputs": inputs}, num_threads=torch.get_num_threads())
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def predicted_labels(outputs: Any) -> Tensor:
    logits = first_tensor(outputs) if not isinstance(outputs, Tensor) else outputs
    if logits is None:
        raise TypeError(f"The model returned {type(outputs).__name__}; accuracy needs a tensor of scores.")
    if logits.ndim > 1 and logits.shape[-1] > 1:
        return logits.argmax(dim=-1)
    return (logits.reshape(len(logits)) > 0).long()


def val_dataloaders(trainer: Any) -> list[Any]:
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and type(datamodule).val_dataloader is not _base_val_dataloader():
            loaders = datamodule.val_dataloader()
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _base_val_dataloader() -> Any:
    import lightning.pytorch as pl

    return pl.LightningDataModule.val_dataloader


def collect_predictions(
    models: Mapping[str, Callable[..., Any]],
    loaders: Iterable[Any],
    contract: BatchContract,
    device: torch.device,
    max_batches: Optional[int] = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Predicted labels of each model over the loaders, and the targets (all on CPU)."""
    preds: dict[str, list[Tensor]] = {name: [] for name in models}
    targets: list[Tensor] = []
    with torch.no_grad():
        for loader in loaders:
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                inputs = map_tensors(contract.inputs(batch), lambda t: t.to(device))
                targets.append(torch.as_tensor(contract.target(batch)).reshape(-1).cpu())
                for name, model in models.items():
                    preds[name].append(predicted_labels(model(inputs)).reshape(-1).cpu())
    empty = torch.zeros(0, dtype=torch.long)
    return {n: torch.cat(p) if p else empty for n, p in preds.items()}, (torch.cat(targets) if targets else empty)


def reduced_mean(trainer: Any, hits: Tensor) -> Optional[float]:
    """Mean of a 0/1 vector over every rank (sum and count all-reduced)."""
    stats = torch.tensor([float(hits.sum()), float(hits.numel())], dtype=torch.float64)
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and getattr(trainer, "world_size", 1) > 1:
        stats = strategy.reduce(stats.to(strategy.root_device), reduce_op="sum").cpu()
    return float(stats[0] / stats[1]) if stats[1] > 0 else None


def tensor_bytes(tensors: Iterable[Any]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def cpu_copy(model: nn.Module) -> nn.Module:
    """An eval-mode CPU deep copy (for latency and MACs without touching the training module)."""
    clone = copy.deepcopy(model).cpu()
    clone.eval()
    return clone


@contextlib.contextmanager
def plain_forward(module: nn.Module) -> Iterator[nn.Module]:
    """The module's own (float) ``forward`` while inside, even when QAT routes it through fake quantization."""
    override = module.__dict__.pop("forward", None)
    try:
        yield module
    finally:
        if override is not None:
            module.__dict__["forward"] = override


def on_checkpoint_load(trainer: Any, module: nn.Module, fn: Callable[[Mapping[str, Any]], None]) -> Any:
    """Call ``fn(checkpoint)`` when Lightning loads a checkpoint's weights into ``module``, before any
    weight is copied (a pruned or quantized structure must exist first).

    Lightning restores the module's weights before any callback hook sees the checkpoint, and a
    Trainer's ``ckpt_path`` is only known once restoring starts, so this is a load-state-dict
    pre-hook on the root module: it runs before the children load, and reads the checkpoint the
    Trainer has just read (``fit/validate/test/predict(ckpt_path=...)``).
    """

    def hook(mod: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        if prefix:
            return
        connector = getattr(trainer, "_checkpoint_connector", None)
        checkpoint = getattr(connector, "_loaded_checkpoint", None)
        saved = checkpoint.get("state_dict") if checkpoint else None
        if not saved:
            return
        key = next(iter(saved))
        if state_dict.get(key) is saved[key]:  # torch copies the mapping, not the tensors: this is that checkpoint
            fn(checkpoint)

    return module.register_load_state_dict_pre_hook(hook)
