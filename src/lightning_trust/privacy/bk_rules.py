"""The per-layer rules of the one-backward (book-keeping) DP mode: what one layer call contributes
to each parameter's per-sample gradients, from its input activations and output gradients, and the
per-sample norms and clipped sums of those contributions.

A layer call contributes either an *outer* form ``G_i = sum_t rows_it ⊗ cols_it`` (Linear,
Hugging Face ``Conv1D``, Embedding, Conv with ``groups=1``: the rows of an Embedding are the one-hot
token ids), whose norm is computed without building ``G_i`` (the ghost norm) and whose clipped sum
``sum_i c_i G_i`` is one matrix product (or ``index_add``), or a *full* per-sample gradient from
Opacus's grad samplers (LayerNorm, GroupNorm, ...) or functorch (any other layer).

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(3, 2)
    >>> x, g = torch.randn(4, 5, 3), torch.randn(4, 5, 2)
    >>> grads = {p: ParamGrads(p, []) for p in layer.parameters()}
    >>> for p, part in contributions(layer, [x], g, {id(p) for p in layer.parameters()}):
    ...     grads[p].parts.append(part)
    >>> per_sample = torch.einsum("nti,ntj->nij", g, x)
    >>> torch.allclose(grads[layer.weight].norm2(), per_sample.flatten(1).pow(2).sum(1), atol=1e-5)
    True
    >>> c = torch.rand(4)
    >>> torch.allclose(grads[layer.weight].clipped(c), torch.einsum("n,nij->ij", c, per_sample), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.layers.dp_rnn import RNNLinear
from opacus.utils.tensor_utils import unfold2d
from torch import Tensor, nn

__all__ = ["Outer", "ParamGrads", "contributions", "has_bk_rule", "has_rule", "is_hf_conv1d"]


@dataclass
class Outer:
    """Per-sample gradient ``G_i = sum_t rows[i, t] ⊗ cols[i, t]`` of a weight viewed as ``(R, C)``:
    ``rows`` dense ``(B, N, R)`` or integer ids ``(B, N)`` (one-hot rows), ``cols`` ``(B, N, C)``."""

    rows: Tensor
    cols: Tensor

    @property
    def indexed(self) -> bool:
        return not self.rows.is_floating_point()


Part = Union[Outer, Tensor]  # a Tensor part is a full per-sample gradient (B, *param.shape)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's linear layers, weight ``(in, out)``), without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _conv_outer(module: nn.Module) -> bool:
    if type(module) not in (nn.Conv1d, nn.Conv2d) or module.groups != 1 or module.padding_mode != "zeros":
        return False
    return not (type(module) is nn.Conv2d and module.padding == "valid")


def has_bk_rule(module: nn.Module) -> bool:
    """Whether the layer has an outer-form (ghost norm, one product) rule."""
    return type(module) in (nn.Linear, RNNLinear, nn.Embedding) or is_hf_conv1d(module) or _conv_outer(module)


def has_rule(module: nn.Module) -> bool:
    """Whether the layer has a book-keeping rule or an Opacus grad sampler (no functorch needed)."""
    return has_bk_rule(module) or type(module) in GradSampleHooks.GRAD_SAMPLERS


def _unfold(module: Any, x: Tensor) -> Tensor:
    """Conv input as ``(B, L, C_in * kernel)`` patches (Opacus's unfolding)."""
    if type(module) is nn.Conv2d:
        patches = unfold2d(
            x, kernel_size=module.kernel_size, padding=module.padding, stride=module.stride, dilation=module.dilation
        )
    else:
        if module.padding == "same":
            total = module.dilation[0] * (module.kernel_size[0] - 1)
            left, right = math.floor(total / 2), total - math.floor(total / 2)
        elif module.padding == "valid":
            left, right = 0, 0
        else:
            left, right = module.padding[0], module.padding[0]
        patches = F.unfold(
            F.pad(x.unsqueeze(-2), (left, right)),
            kernel_size=(1, module.kernel_size[0]),
            stride=(1, module.stride[0]),
            dilation=(1, module.dilation[0]),
        )
    return patches.transpose(1, 2)


def _outer_parts(module: Any, x: Tensor, grad: Tensor) -> list[tuple[Tensor, Part]]:
    batch = grad.shape[0]
    bias = getattr(module, "bias", None)
    if type(module) is nn.Embedding:
        ids = x.reshape(batch, -1)
        return [(module.weight, Outer(ids, grad.reshape(batch, ids.shape[1], -1)))]
    if is_hf_conv1d(module):  # weight (in, out): rows are the inputs
        x, grad = x.reshape(batch, -1, x.shape[-1]), grad.reshape(batch, -1, grad.shape[-1])
        weight = Outer(x, grad)
    elif type(module) in (nn.Conv1d, nn.Conv2d):
        x = _unfold(module, x)
        grad = grad.reshape(batch, grad.shape[1], -1).transpose(1, 2)
        weight = Outer(grad, x)
    else:
        x, grad = x.reshape(batch, -1, x.shape[-1]), grad.reshape(batch, -1, grad.shape[-1])
        weight = Outer(grad, x)
    parts: list[tuple[Tensor, Part]] = [(module.weight, weight)]
    if bias is not None:
        parts.append((bias, grad.sum(1)))
    return parts


def contributions(
    module: nn.Module, activations: list[Any], grad: Tensor, wanted: set[int]
) -> list[tuple[Tensor, Part]]:
    """What one call of ``module`` (inputs ``activations``, output gradient ``grad``) contributes to
    the per-sample gradients of its parameters in ``wanted`` (ids)."""
    if has_bk_rule(module):
        x = activations[0]
        if x.is_floating_point() and x.dtype != grad.dtype:
            x = x.to(grad.dtype)
        parts = _outer_parts(module, x, grad)
    else:
        if type(module) in GradSampleHooks.GRAD_SAMPLERS:
            sampled = GradSampleHooks.GRAD_SAMPLERS[type(module)](module, activations, grad)
        else:
            sampled = ft_compute_per_sample_gradient(module, activations, grad)
        parts = list(sampled.items())
    return [(p, part) for p, part in parts if id(p) in wanted]


def _cat(outers: list[Outer]) -> Outer:
    if len(outers) == 1:
        return outers[0]
    return Outer(torch.cat([o.rows for o in outers], 1), torch.cat([o.cols for o in outers], 1))


def _materialize(outer: Outer, param: Tensor) -> Tensor:
    batch, cols = outer.cols.shape[0], outer.cols.shape[-1]
    if outer.indexed:
        full = outer.cols.new_zeros(batch, param.shape[0], cols)
        full.scatter_add_(1, outer.rows.unsqueeze(-1).expand(-1, -1, cols), outer.cols)
    else:
        full = torch.bmm(outer.rows.transpose(1, 2), outer.cols)  # faster than the equivalent einsum on CPU
    return full.reshape(batch, *param.shape)


def _rows_gram(a: Outer, b: Outer) -> Tensor:
    """``rows_a[i, t] · rows_b[i, s]`` for every sample, ``(B, N_a, N_b)``."""
    if a.indexed and b.indexed:
        return (a.rows.unsqueeze(2) == b.rows.unsqueeze(1)).to(a.cols.dtype)
    if a.indexed:
        return _rows_gram(b, a).transpose(1, 2)
    if b.indexed:
        return torch.gather(a.rows, 2, b.rows.unsqueeze(1).expand(-1, a.rows.shape[1], -1))
    return torch.bmm(a.rows, b.rows.transpose(1, 2))


def _ghost(a: Outer, b: Outer) -> Tensor:
    """``<G_a_i, G_b_i>`` per sample without building either gradient."""
    return (_rows_gram(a, b) * torch.bmm(a.cols, b.cols.transpose(1, 2))).sum((1, 2))


class ParamGrads:
    """Every contribution to one parameter's per-sample gradients in a batch (a tied parameter: from
    each of its layers), with their per-sample squared norms and clipped sum.

    For a weight used once, the norm comes from its per-sample gradient ``B x R x C`` built and
    dropped at once, or from the ghost Gram ``B x N x N`` when that is cheaper (``N (R + C) < R C``);
    the clipped sum is always one matrix product (or ``index_add``), as in a plain backward."""

    def __init__(self, param: Tensor, parts: list[Part]) -> None:
        self.param = param
        self.parts = parts
        self._prepared: list[Part] = []
        self._norm2: Optional[Tensor] = None

    def _prepare(self) -> list[Part]:
        if self._prepared:
            return self._prepared
        dtype = self.param.dtype
        parts = [
            (Outer(p.rows if p.indexed else p.rows.to(dtype), p.cols.to(dtype)) if p.cols.dtype != dtype else p)
            if isinstance(p, Outer)
            else p.to(dtype)
            for p in self.parts
        ]
        fulls = [p for p in parts if not isinstance(p, Outer)]
        outers = [p for p in parts if isinstance(p, Outer)]
        merged = [_cat(g) for g in ([o for o in outers if not o.indexed], [o for o in outers if o.indexed]) if g]
        if fulls:  # a weight also given full per-sample gradients (a tied LayerNorm...): everything full
            total = fulls[0].reshape(-1, *self.param.shape)
            for other in fulls[1:] + [_materialize(o, self.param) for o in merged]:
                total = total + other.reshape(total.shape)
            self._prepared = [total]
        else:
            self._prepared = list(merged)
        return self._prepared

    def norm2(self) -> Tensor:
        """Per-sample squared gradient norms ``(B,)`` (computed once)."""
        if self._norm2 is None:
            self._norm2 = self._compute_norm2()
        return self._norm2

    def _compute_norm2(self) -> Tensor:
        parts = self._prepare()
        if len(parts) == 1 and not isinstance(parts[0], Outer):
            return torch.linalg.vector_norm(parts[0].flatten(1), dim=1).pow(2)
        outers = [p for p in parts if isinstance(p, Outer)]
        if len(outers) == 1 and not outers[0].indexed:
            tokens, rows, cols = outers[0].rows.shape[1], outers[0].rows.shape[2], outers[0].cols.shape[2]
            if tokens * (rows + cols) >= rows * cols:
                full = torch.bmm(outers[0].rows.transpose(1, 2), outers[0].cols)
                return torch.linalg.vector_norm(full.flatten(1), dim=1).pow(2)
        total = torch.stack([_ghost(o, o) for o in outers]).sum(0)
        if len(outers) == 2:  # dense and indexed uses of one tied weight
            total = total + 2 * _ghost(outers[0], outers[1])
        return total.clamp(min=0)

    def clipped(self, weights: Tensor) -> Tensor:
        """``sum_i weights[i] * G_i``, shaped like the parameter."""
        parts = self._prepare()
        weights = weights.to(self.param.dtype)
        if len(parts) == 1 and not isinstance(parts[0], Outer):
            return torch.tensordot(weights, parts[0], dims=1).view_as(self.param)
        out = self.param.new_zeros(self.param.shape[0], self.param[0].numel())
        for o in parts:
            assert isinstance(o, Outer)
            if o.indexed:
                cols = o.cols * weights.view(-1, 1, 1)
                out.index_add_(0, o.rows.reshape(-1), cols.reshape(-1, cols.shape[-1]))
                continue
            rows, cols = o.rows, o.cols
            if rows.shape[-1] <= cols.shape[-1]:  # scale the narrower factor
                rows = rows * weights.view(-1, 1, 1)
            else:
                cols = cols * weights.view(-1, 1, 1)
            out.addmm_(rows.reshape(-1, rows.shape[-1]).t(), cols.reshape(-1, cols.shape[-1]))
        return out.view_as(self.param)
