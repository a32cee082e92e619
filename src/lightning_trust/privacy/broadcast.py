"""Per-sample gradients need every hooked layer to see the batch: index inputs broadcast over the
batch are expanded, anything else broadcast is refused naming the layer.

Hugging Face looks position embeddings up with ids of shape ``(1, L)`` (GPT-2 ``wpe``, BERT
``position_embeddings``) and BERT's default token types with a stride-0 ``expand`` of a buffer;
autograd then sums the embedding's gradient over the batch before Opacus sees it. While DP hooks
are on, :class:`BatchAlignment` expands such an index to ``(batch, L)`` (contiguous) before the
embedding runs: the embedding's output is broadcast-added exactly as before, so the model's
outputs are unchanged, and Opacus gets one gradient per sample. Any other layer whose input batch
dimension is not the batch (a weight applied to a broadcast tensor) raises ``ValueError`` naming
the layer and the fix, before the backward pass; in ghost mode, a layer used twice in one forward
(a tied or reused module) is refused naming ``grad_sample_mode='hooks'``.

The batch size is the first tensor given to the attached module's ``forward`` (the
LightningModule's ``self(...)``), else the first hooked layer's input in the training step.

Example:
    >>> import torch
    >>> class Positions(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.tok, self.pos = torch.nn.Embedding(10, 4), torch.nn.Embedding(6, 4)
    ...     def forward(self, ids):
    ...         return self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
    >>> model, ids = Positions(), torch.randint(0, 10, (3, 5))
    >>> before = model(ids)
    >>> alignment = BatchAlignment(lambda: True)
    >>> alignment.attach(model)
    >>> torch.equal(model(ids), before), alignment.batch_size
    (True, 3)
    >>> alignment.detach()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from opacus.utils.module_utils import has_trainable_params
from torch import Tensor, nn

from lightning_trust.core import iter_tensors
from lightning_trust.privacy.copies import SharedOnCopy

__all__ = ["BatchAlignment", "hooked_layers"]


def hooked_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (dotted name, layer) pairs Opacus hooks: layers with trainable parameters of their own,
    not descending into layers that functorch handles whole (Opacus's ``iterate_submodules``)."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, layer: nn.Module) -> None:
        trainable = has_trainable_params(layer)
        if trainable:
            found.append((prefix, layer))
        if trainable and type(layer) not in GradSampleHooks.GRAD_SAMPLERS and type(layer) not in (DPRNN, DPLSTM, DPGRU):
            return
        for name, child in layer.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", module)
    return found


def _first_batch_size(args: Any, kwargs: Any) -> Optional[int]:
    for tensor in iter_tensors((args, kwargs)):
        if tensor.dim() >= 1:
            return int(tensor.shape[0])
    return None


class BatchAlignment(SharedOnCopy):
    """Forward pre-hooks that give every hooked layer the batch dimension (see the module docstring).

    ``active()`` says whether per-sample gradients are being recorded now (the Opacus hooks are
    enabled); ``refuse_reuse()`` says whether a norm-sampled layer used twice in one forward is
    refused (ghost mode).
    """

    def __init__(self, active: Callable[[], bool], refuse_reuse: Callable[[], bool] = lambda: False) -> None:
        self.active = active
        self.refuse_reuse = refuse_reuse
        self.batch_size: Optional[int] = None
        self._handles: list[Any] = []

    def _recording(self, layer: nn.Module) -> bool:
        return layer.training and torch.is_grad_enabled() and self.active()

    def attach(self, module: nn.Module) -> None:
        """Pre-hooks on ``module`` (the batch size) and on every layer Opacus hooks."""
        self.detach()
        self._handles.append(module.register_forward_pre_hook(self._record_batch, with_kwargs=True))
        for name, layer in hooked_layers(module):
            if isinstance(layer, nn.Embedding):
                self._handles.append(layer.register_forward_pre_hook(self._expand_index))
            self._handles.append(layer.register_forward_pre_hook(self._checker(name or type(module).__name__)))

    def detach(self) -> None:
        """Remove every pre-hook; the module is the user's again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.batch_size = None

    def begin_batch(self) -> None:
        """A new training batch: its size is read again."""
        self.batch_size = None

    # ------------------------------------------------------------------ hooks
    def _record_batch(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._recording(module):
            size = _first_batch_size(args, kwargs)
            if size is not None:
                self.batch_size = size

    def _expand_index(self, layer: nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        if not args or not isinstance(args[0], Tensor) or not self._recording(layer):
            return None
        index, batch = args[0], self.batch_size
        if batch is not None and index.dim() >= 2 and index.shape[0] == 1 and batch > 1:
            index = index.expand(batch, *index.shape[1:])
        if not index.is_contiguous():  # stride-0 expanded ids (BERT's token types): Opacus's norm sampler views them
            index = index.contiguous()
        return None if index is args[0] else (index, *args[1:])

    def _checker(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def check(layer: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._recording(layer):
                return
            tensors = [a for a in args if isinstance(a, Tensor)]
            if not tensors or tensors[-1].dim() == 0:
                return
            size = int(tensors[-1].shape[0])  # the input Opacus reads the batch size from
            if self.batch_size is None:
                self.batch_size = size
            elif size != self.batch_size:
                raise ValueError(
                    f"DifferentialPrivacy: layer `{name}` ({type(layer).__name__}) gets an input of batch size {size} "
                    f"in a batch of {self.batch_size} (shape {tuple(tensors[-1].shape)}): it is applied to a tensor "
                    "broadcast over the batch, so autograd sums its gradient over the samples before they can be "
                    "clipped one by one. Pass it an input with the batch dimension first (e.g. "
                    "`x.expand(batch_size, *x.shape[1:])`), or freeze the layer (`requires_grad_(False)`)."
                )
            if (
                type(layer) in GradSampleHooksFastGradientClipping.NORM_SAMPLERS
                and any(getattr(p, "_forward_counter", 0) > 0 for p in layer.parameters(recurse=False))
                and self.refuse_reuse()
            ):
                raise ValueError(
                    f"DifferentialPrivacy(grad_sample_mode='ghost'): layer `{name}` ({type(layer).__name__}) is "
                    "used twice in one forward pass (a reused module or a tied weight); ghost clipping cannot "
                    "compute the norm of its summed per-sample gradient. Use grad_sample_mode='hooks'."
                )

        return check
