"""Per-sample content keys: a sample gets the same key whatever its batch, process or position.

The uncertainty evaluation splits validation into calibration and evaluation by these keys (a
sample calibrates when its key's coin falls below ``calibration_fraction``) and sorts rows gathered
from every process by them, so a run under DDP, with any sharding and batch sizes, splits, fits and
tests exactly as one process on the same data. A key is a seeded hash of the sample's input tensors
and label: each element's bits (floats as their IEEE bits) times a pseudo-random weight of its
position, summed modulo the prime ``2**31 - 1``, then mixed; two such hashes make the 62-bit key.
Only integer arithmetic below ``2**63`` runs, on the batch's device. Elements that are zero, or where
an ``attention_mask`` is zero, contribute nothing, so right padding to any length keeps the key.

Example:
    >>> import torch
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> whole = sample_keys(x, y, seed=0)
    >>> torch.equal(torch.cat([sample_keys(x[:2], y[:2], 0), sample_keys(x[2:], y[2:], 0)]), whole)
    True
    >>> calibrates(whole, 0.5).dtype
    torch.bool
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_trust.core.tensors import iter_tensors

__all__ = ["PRIME", "calibrates", "sample_keys"]

#: The hash modulus (a Mersenne prime: every product of two residues stays below ``2**62``).
PRIME = 2_147_483_647
_MULTIPLIERS = (1_103_515_245, 2_654_435_761 % PRIME, 1_597_334_677)


def _mix(x: Tensor) -> Tensor:
    """A fixed nonlinear scrambling of residues ``[0, PRIME)`` (multiply, then xor-shift)."""
    for m in _MULTIPLIERS:
        x = (x * m) % PRIME
        x = (x ^ (x >> 16)) % PRIME
    return x


def _bits(t: Tensor) -> Tensor:
    """The tensor's elements as int64 (floating point: their IEEE bits), one row per sample."""
    if t.dtype == torch.bool:
        return t.reshape(t.shape[0], -1).long()
    if t.is_floating_point():
        view = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(t.dtype)
        t = t.contiguous()
        t = t.view(view) if view is not None else t.view(torch.int32)  # float64: two int32 per element
    if t.is_complex():
        t = torch.view_as_real(t).contiguous().view(torch.int32)
    return t.reshape(t.shape[0], -1).long()


def _row_hash(bits: Tensor, salt: int) -> Tensor:
    """``sum_i bits_i * w(i, salt) mod PRIME`` per row."""
    positions = torch.arange(bits.shape[1], device=bits.device, dtype=torch.long)
    weights = _mix((positions + salt) % PRIME) + 1
    return ((bits.remainder(PRIME) * weights) % PRIME).sum(dim=1) % PRIME


def _sample_tensors(inputs: Any, target: Any, n: int) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` of every per-sample tensor, padding masked out, in a fixed order."""
    named = sorted(inputs.items()) if isinstance(inputs, Mapping) else list(enumerate(iter_tensors(inputs)))
    out = [(str(k), v) for k, v in named if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n]
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[0] == n:
        keep = mask != 0
        out = [(k, torch.where(keep.reshape(*keep.shape, *([1] * (v.ndim - 2))), v, torch.zeros_like(v)))
               if v.ndim >= 2 and v.shape[:2] == keep.shape else (k, v) for k, v in out]  # fmt: skip
    return [*out, ("__target__", torch.as_tensor(target).reshape(n, -1))]


def sample_keys(inputs: Any, target: Any, seed: int = 0) -> Tensor:
    """``(n,)`` int64 keys in ``[0, PRIME**2)`` of a batch's samples: ``inputs`` (a tensor, a
    sequence of tensors or a dict of model keyword arguments) and ``target``, ``seed``-dependent."""
    labels = torch.as_tensor(target)
    n = int(labels.shape[0]) if labels.ndim else 1
    tensors = _sample_tensors(inputs, labels, n)
    if len(tensors) < 2:
        raise ValueError(
            "UncertaintyEvaluation keys each sample by its input tensors, and this batch's inputs hold no tensor "
            f"with one row per sample ({n} samples); return tensors from the dataloader or set `batch_keys`."
        )
    device = tensors[0][1].device
    halves = []
    for half in (1, 2):
        acc = torch.full((n,), (seed * 7_919 + half) % PRIME, dtype=torch.long, device=device)
        for name, t in tensors:
            salt = (zlib.crc32(name.encode()) + 104_729 * half + 15_485_863 * seed) % PRIME
            acc = _mix((acc + _row_hash(_bits(t).to(device), salt)) % PRIME)
        halves.append(acc)
    return halves[0] * PRIME + halves[1]


def calibrates(keys: Tensor, fraction: float) -> Tensor:
    """Which samples calibrate: the low half of the key (uniform in ``[0, 1)``) below ``fraction``."""
    return (keys % PRIME).double() / PRIME < fraction
