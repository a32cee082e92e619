"""Empty Poisson draws: a legitimate outcome of Poisson sampling that must still be one noisy step.

Each example joins a logical batch with probability q, so a batch can be empty (often, when
``q * N`` is small). Opacus's answer is a noise-only step: the clipped sum is zero, the Gaussian
noise is added and the accountant counts the step. Two things stand in the way in a Lightning fit:

* the batch itself: Opacus's ``DPDataLoader`` learns the structure of an empty batch from the first
  non-empty one, so an empty *first* draw becomes a list of one-dimensional empty tensors (one per
  element of ``dataset[0]``), not the user's tuple, dict or tensor. :class:`EmptyDrawCollate`
  builds it from the user's ``collate_fn`` applied to one sample, every tensor cut to zero rows;
* the user's code: most models cannot run on zero rows (Hugging Face attention reshapes with
  ``-1``), and a mean loss over no examples is NaN. :class:`EmptyBatchStep` skips the user's
  ``training_step`` and ``backward`` for an empty batch and gives the DP optimizer empty per-sample
  gradients (and zero summed gradients), so it takes the noise-only step and feeds the accountant,
  in every ``grad_sample_mode``. A sample whose shape shows in the empty batch is never trained on.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset, default_collate
    >>> collate = EmptyDrawCollate(default_collate, TensorDataset(torch.randn(5, 3), torch.arange(5)))
    >>> [tuple(t.shape) for t in collate([])]
    [(0, 3), (0,)]
    >>> is_empty(collate([])), is_empty(collate([(torch.ones(3), torch.tensor(1))])), is_empty([])
    (True, False, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_trust.core import iter_tensors, map_tensors

__all__ = ["EmptyBatchStep", "EmptyDrawCollate", "empty_like", "is_empty"]

_MISSING = object()
_SKIPPED = ("training_step", "backward")  # the user's methods an empty batch does not run


def empty_like(batch: Any) -> Any:
    """``batch`` with every tensor of at least one dimension cut to zero rows (same containers)."""
    return map_tensors(batch, lambda t: t[:0] if t.dim() else t)


def is_empty(batch: Any) -> bool:
    """Whether ``batch`` holds no examples: an empty container, or tensors all with zero rows."""
    if isinstance(batch, (Sequence, Mapping)) and not isinstance(batch, (str, bytes)) and len(batch) == 0:
        return True
    rows = [t.shape[0] for t in iter_tensors(batch) if t.dim() >= 1]
    return bool(rows) and max(rows) == 0


class EmptyDrawCollate:
    """The private loader's ``collate_fn``: the user's for a non-empty draw; for an empty one, the
    user's ``collate_fn`` of ``dataset[0]`` with zero rows (the structure the user's code expects)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self._template: Any = _MISSING

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples):
            return self.collate_fn(samples)
        if self._template is _MISSING:
            self._template = empty_like(self.collate_fn([self.dataset[0]]))
        return self._template


class EmptyBatchStep:
    """Skip the user's ``training_step``/``backward`` on an empty batch; keep the noise-only step.

    :meth:`begin` (``on_train_batch_start``) replaces the two methods on the module instance for
    this batch only; :meth:`fill` (``on_before_optimizer_step``) gives each DP parameter that saw
    no example since the last step empty per-sample gradients and a zero gradient; :meth:`end`
    (``on_train_batch_end``, and on an exception) puts the user's methods back.
    """

    def __init__(self) -> None:
        self._saved: dict[str, Any] = {}
        self._module: Optional[pl.LightningModule] = None
        self._rows_since_step = False  # some batch since the last optimizer step held examples
        self.skipped = 0  # empty batches seen this fit

    def begin(self, module: pl.LightningModule, batch: Any) -> None:
        """Before a training batch: if it is empty, the user's step and backward are skipped."""
        self.end()
        if not is_empty(batch):
            self._rows_since_step = True
            return
        self.skipped += 1
        self._module = module
        instance = vars(module)
        self._saved = {name: instance.get(name, _MISSING) for name in _SKIPPED}
        # on the instance, for one batch: Lightning (and DDP's wrapper) look the methods up there
        instance["training_step"] = self._empty_step
        instance["backward"] = _no_backward

    def _empty_step(self, *args: Any, **kwargs: Any) -> Tensor:
        """The step of an empty batch: nothing to compute; with manual optimization, the user's
        optimizer step (the noise-only step) is taken here."""
        module = self._module
        assert module is not None
        if not module.automatic_optimization:
            optimizers = module.optimizers()
            for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
                optimizer.zero_grad()
                optimizer.step()
        return torch.zeros((), device=module.device)  # the sum of the losses of no examples

    def fill(self, optimizer: Any) -> None:
        """Before the DP optimizer's step: no example since the last step, so every per-sample
        gradient is empty (hooks, functorch) and every summed gradient zero (ghost)."""
        empty, self._rows_since_step = not self._rows_since_step, False
        if not empty or optimizer is None:
            return
        for p in optimizer.params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def end(self) -> None:
        """Give the module its own ``training_step`` and ``backward`` back (no-op if none were replaced)."""
        module, self._module = self._module, None
        if module is None:
            return
        instance = vars(module)
        for name, value in self._saved.items():
            if value is _MISSING:
                instance.pop(name, None)
            else:
                instance[name] = value
        self._saved = {}


def _no_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
    """An empty batch has no graph to differentiate; its gradient is set by :meth:`EmptyBatchStep.fill`."""
