"""Example inputs of the compression callbacks: the few rows they trace, export and time with.

Example:
    >>> import torch
    >>> example_from(torch.arange(12.0).reshape(6, 2)).shape
    torch.Size([4, 2])
    >>> example_from(torch.ones(6, 2), private=True).count_nonzero().item()
    0
    >>> repeat_rows(torch.ones(3, 2), 7).shape, example_from_spec([1, 1, 8, 8]).shape
    (torch.Size([7, 2]), torch.Size([1, 1, 8, 8]))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_trust.core.tensors import first_tensor, map_tensors

__all__ = ["EXAMPLE_ROWS", "example_batch_size", "example_from", "example_from_spec", "on_device", "repeat_rows"]

#: Samples kept as the example input in checkpoints: enough to trace, small enough to store.
EXAMPLE_ROWS = 4


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


def example_batch_size(inputs: Any, tensor_only: bool = False) -> int:
    """The batch size the latency is measured at: the leading size of the inputs (1 if none).

    ``tensor_only``: only a bare tensor counts (what pruning has always measured with).
    """
    first = inputs if isinstance(inputs, Tensor) else (None if tensor_only else first_tensor(inputs))
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


def repeat_rows(example: Any, batch_size: int) -> Any:
    """``example`` tiled along the batch dimension to ``batch_size`` rows (for latency measurements)."""

    def tile(t: Tensor) -> Tensor:
        reps = -(-batch_size // t.shape[0])
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch_size].contiguous()

    return map_tensors(example, tile)


def on_device(example: Any, module: nn.Module) -> Any:
    """``example`` on the device of ``module``'s first parameter (CPU for a module without any)."""
    device = next(iter(module.parameters()), torch.empty(0)).device
    return map_tensors(example, lambda t: t.to(device))
