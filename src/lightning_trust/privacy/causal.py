"""``nn.MultiheadAttention`` made DP-compatible with its masks: causal (``is_causal``), 2-D and 3-D
``attn_mask`` and ``key_padding_mask``, for batch-first and sequence-first layouts.

Opacus's ``DPMultiheadAttention`` (what ``ModuleValidator.fix`` substitutes) rejects
``is_causal=True``, which ``nn.Transformer`` passes whenever its mask is the causal one, and checks
a 2-D mask against the batch size in the batch-first layout. :class:`CausalDPMultiheadAttention`
keeps its layers (``qlinear``/``klinear``/``vlinear``/``out_proj``, so Opacus's Linear grad
samplers apply) and computes attention the way ``torch.nn.functional.multi_head_attention_forward``
does; :func:`replace_attention` swaps every ``nn.MultiheadAttention`` of a module in place, with
the original weights copied, so outputs equal the original's.

The projections always run batch-first (a sequence-first input is transposed first): Opacus's
hooks read the batch from the first dimension.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> dp = CausalDPMultiheadAttention.from_module(mha).eval()
    >>> x = torch.randn(3, 5, 8)
    >>> mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    >>> want = mha(x, x, x, attn_mask=mask, is_causal=True)[0]
    >>> torch.allclose(dp(x, x, x, attn_mask=mask, is_causal=True)[0], want, atol=1e-6)
    True
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from opacus.layers import DPMultiheadAttention
from torch import Tensor, nn

__all__ = ["CausalDPMultiheadAttention", "replace_attention"]


def _as_additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class CausalDPMultiheadAttention(DPMultiheadAttention):
    """Opacus's ``DPMultiheadAttention`` with ``nn.MultiheadAttention``'s full mask semantics."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self.add_bias_kv:  # the projections run batch-first here
            self.seq_bias_k.batch_first = True
            self.seq_bias_v.batch_first = True

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> CausalDPMultiheadAttention:
        """A copy of ``module`` (same configuration, weights, device and dtype)."""
        weight = module.out_proj.weight
        dp = cls(
            embed_dim=module.embed_dim,
            num_heads=module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        ).to(device=weight.device, dtype=weight.dtype)
        linears = (dp.qlinear, dp.klinear, dp.vlinear)
        sources: list[tuple[Tensor, Tensor, Tensor]]
        if module.in_proj_weight is not None:
            sources = [
                (lin.weight, w, module.in_proj_weight) for lin, w in zip(linears, module.in_proj_weight.chunk(3))
            ]
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            sources = [(lin.weight, w, w) for lin, w in zip(linears, weights)]
        if module.in_proj_bias is not None:
            sources += [(lin.bias, b, module.in_proj_bias) for lin, b in zip(linears, module.in_proj_bias.chunk(3))]
        sources.append((dp.out_proj.weight, module.out_proj.weight, module.out_proj.weight))
        if module.out_proj.bias is not None:
            sources.append((dp.out_proj.bias, module.out_proj.bias, module.out_proj.bias))
        if module.bias_k is not None and module.bias_v is not None:
            sources.append((dp.seq_bias_k.bias, module.bias_k.reshape(-1), module.bias_k))
            sources.append((dp.seq_bias_v.bias, module.bias_v.reshape(-1), module.bias_v))
        with torch.no_grad():
            for target, value, original in sources:
                target.copy_(value)
                target.requires_grad_(original.requires_grad)  # a frozen attention stays frozen
        dp.train(module.training)
        return dp

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if query.dim() != 3:
            raise ValueError(f"CausalDPMultiheadAttention needs batched 3-D inputs, got shape {tuple(query.shape)}.")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, target_len, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self.qlinear(query), self.klinear(key), self.vlinear(value)
        if self.add_bias_kv:
            k, v = self.seq_bias_k(k), self.seq_bias_v(v)
        q = q.view(batch, target_len, heads, head_dim).transpose(1, 2)
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
        source_len = k.shape[2]
        extra = source_len - key.shape[1]  # bias_kv / zero-attention columns, never masked

        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))  # (B, H, Lq, S)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, batch, target_len, key.shape[1], scores.dtype)
        if mask is not None:
            if extra:
                mask = F.pad(mask, (0, extra))
            scores = scores + mask
        weights = self.dropout(F.softmax(scores, dim=-1))
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, target_len, embed)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights

    def _mask(
        self,
        attn_mask: Optional[Tensor],
        key_padding_mask: Optional[Tensor],
        is_causal: bool,
        batch: int,
        target_len: int,
        source_len: int,
        dtype: torch.dtype,
    ) -> Optional[Tensor]:
        """One additive mask broadcastable to (batch, heads, target, source); ``is_causal`` is a hint
        that ``attn_mask`` is the causal mask, and builds it when none is given (as torch does)."""
        mask = _as_additive(attn_mask, dtype)
        if mask is None and is_causal:
            causal = torch.ones(target_len, source_len, dtype=torch.bool, device=self.qlinear.weight.device).triu(1)
            mask = _as_additive(causal, dtype)
        if mask is not None:
            if mask.dim() == 3:  # (batch * heads, target, source)
                mask = mask.view(batch, self.num_heads, target_len, source_len)
            elif mask.dim() != 2:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(mask.shape)}.")
        padding = _as_additive(key_padding_mask, dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, source_len)
            mask = padding if mask is None else mask + padding
        return mask


def replace_attention(module: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` inside ``module`` (in place, weights copied) with
    :class:`CausalDPMultiheadAttention`; return the dotted names replaced."""
    replaced = []
    for name, child in list(module.named_modules()):
        if type(child) is nn.MultiheadAttention:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, CausalDPMultiheadAttention.from_module(child))
            replaced.append(name)
    return replaced
