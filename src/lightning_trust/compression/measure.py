"""What both compression callbacks measure: CPU latency, accuracy and agreement over loaders.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from lightning_trust.core.batch import BatchContract
    >>> x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
    >>> model = torch.nn.Linear(3, 2)
    >>> preds, target = collect_predictions({"m": model}, [DataLoader(TensorDataset(x, y), batch_size=4)],
    ...                                     BatchContract(), torch.device("cpu"))
    >>> preds["m"].shape, target.tolist() == [0] * 8
    (torch.Size([8]), True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_trust.core.batch import BatchContract, call_module, logits_of
from lightning_trust.core.tensors import map_tensors

__all__ = ["collect_predictions", "cpu_copy", "measure_latency", "predicted_labels", "reduced_mean"]


def measure_latency(
    model: Callable[..., Any],
    inputs: Any,
    min_run_time: float = 0.3,
    call: Callable[[Any, Any], Any] = call_module,
) -> float:
    """Median seconds per ``call(model, inputs)`` on CPU under ``torch.no_grad()`` (torch.utils.benchmark)."""
    from torch.utils.benchmark import Timer

    with torch.no_grad():
        for _ in range(3):  # warm-up (and compilation, for compiled models)
            call(model, inputs)
        timer = Timer(
            stmt="call_module(model, inputs)",
            globals={"model": model, "inputs": inputs, "call_module": call},
            num_threads=torch.get_num_threads(),
        )
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def predicted_labels(outputs: Any) -> Tensor:
    """The predicted class of each row: the argmax of multi-class scores, ``score > 0`` for one score."""
    logits = logits_of(outputs)
    if logits.ndim > 1 and logits.shape[-1] > 1:
        return logits.argmax(dim=-1)
    return (logits.reshape(len(logits)) > 0).long()


def collect_predictions(
    models: Mapping[str, Callable[..., Any]],
    loaders: Iterable[Any],
    contract: BatchContract,
    device: torch.device,
    max_batches: Optional[int] = None,
    inputs_of: Optional[Callable[[Any], Any]] = None,
    call: Callable[[Any, Any], Any] = call_module,
    with_target: bool = True,
) -> tuple[dict[str, Tensor], Tensor]:
    """Predicted labels of each model over the loaders, and the targets (all on CPU).

    ``inputs_of(batch)`` gives what ``call(model, inputs)`` takes (default: the contract's inputs);
    ``with_target=False``: batches without targets (the targets returned are empty).
    """
    inputs_of = contract.inputs if inputs_of is None else inputs_of
    preds: dict[str, list[Tensor]] = {name: [] for name in models}
    targets: list[Tensor] = []
    with torch.no_grad():
        for loader in loaders:
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                inputs = map_tensors(inputs_of(batch), lambda t: t.to(device))
                if with_target:
                    targets.append(torch.as_tensor(contract.target(batch)).reshape(-1).cpu())
                for name, model in models.items():
                    preds[name].append(predicted_labels(call(model, inputs)).reshape(-1).cpu())
    empty = torch.zeros(0, dtype=torch.long)
    return {n: torch.cat(p) if p else empty for n, p in preds.items()}, (torch.cat(targets) if targets else empty)


def reduced_mean(trainer: Any, hits: Tensor) -> Optional[float]:
    """Mean of a 0/1 vector over every rank (sum and count all-reduced)."""
    stats = torch.tensor([float(hits.sum()), float(hits.numel())], dtype=torch.float64)
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and getattr(trainer, "world_size", 1) > 1:
        stats = strategy.reduce(stats.to(strategy.root_device), reduce_op="sum").cpu()
    return float(stats[0] / stats[1]) if stats[1] > 0 else None


def cpu_copy(model: nn.Module) -> nn.Module:
    """An eval-mode CPU deep copy (for latency and MACs without touching the training module)."""
    clone = copy.deepcopy(model).cpu()
    clone.eval()
    return clone
