"""Sharded training (FSDP) under DP: what is refused and why, before training.

Opacus's FSDP support (``grad_sample_mode="ghost_fsdp"``: ``FSDP2Wrapper``,
``GradSampleModuleFastGradientClippingFSDP``, ``FSDPOptimizerFastGradientClipping``) needs the
model sharded layer by layer with FSDP2's ``fully_shard`` by Opacus itself, and ghost clipping.
Lightning's ``FSDPStrategy`` wraps the model in FSDP1's ``FullyShardedDataParallel``, whose
flattened parameters carry no per-sample gradients, and requires CUDA (it refuses
``accelerator="cpu"`` itself); ``ModelParallelStrategy`` shards in the user's ``configure_model``
with layouts Opacus's norm samplers do not know. Neither can be made private by attaching hooks to
the unchanged module, so both are refused with the alternative: DDP with ghost clipping and
``max_physical_batch_size`` for memory.

Example:
    >>> import lightning.pytorch as pl
    >>> check_sharded(pl.Trainer(accelerator="cpu", devices=1, logger=False).strategy)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

__all__ = ["check_sharded"]


def check_sharded(strategy: Any) -> None:
    """Refuse Lightning's sharded strategies (FSDP, model parallel) with the reason and the fix."""
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            f"DifferentialPrivacy cannot train under {type(strategy).__name__}: Lightning's FSDP strategy shards "
            "the model with FSDP1 `FullyShardedDataParallel`, whose flattened parameters carry no per-sample "
            "gradients, and Opacus's FSDP support (`ghost_fsdp`) needs FSDP2 `fully_shard` applied layer by layer "
            "by Opacus. Use strategy='ddp' with DifferentialPrivacy(grad_sample_mode='ghost', "
            "max_physical_batch_size=...) to fit memory, or a parameter-efficient fine-tune (LoRA: only the "
            "adapters carry gradients)."
        )
    if isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            "DifferentialPrivacy cannot train under ModelParallelStrategy: the model is sharded in "
            "`configure_model` (FSDP2 / tensor parallel) in layouts Opacus's per-sample norm hooks do not follow. "
            "Use strategy='ddp' with DifferentialPrivacy(grad_sample_mode='ghost', max_physical_batch_size=...)."
        )
