"""Opacus on one fit of an unchanged module: the per-sample-gradient hooks on the module, the
Poisson-sampled train loader in the fit loop (through the seam), the user's optimizer in a
``DPOptimizer``, and all of it taken off again after fit (or an exception).

During training it keeps them consistent: a module whose parameters were replaced (structural
pruning) is hooked again and its DP optimizer checked, per-sample gradients are scaled back when
Lightning divides the loss for gradient accumulation, and Lightning's DDP all-reduce stays off
(the ``DistributedDPOptimizer`` all-reduces the noisy sum once).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> opacus = OpacusAttachment("hooks", max_grad_norm=1.0)
    >>> opacus.grads.attach(model)
    >>> model(torch.randn(4, 3)).sum().backward()
    >>> tuple(model[0].weight.grad_sample.shape), opacus.optimizer is None
    ((4, 2, 3), True)
    >>> opacus.grads.detach()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim import Optimizer

from lightning_trust.privacy import loader as private_loader
from lightning_trust.privacy.broadcast import BatchAlignment
from lightning_trust.privacy.hooks import PerSampleGradients
from lightning_trust.privacy.optimizer import (
    add_before_noise,
    check_holds_parameters,
    scale_grad_samples,
    set_ddp_grad_sync,
    unwrap_optimizers,
    wrap_optimizer,
)

__all__ = ["OpacusAttachment"]


class OpacusAttachment:
    """Opacus's hooks, the private loader and the DP optimizer of one fit.

    ``accumulate`` (the Trainer's ``accumulate_grad_batches``) and ``physical_parts`` (physical
    batches per logical batch with ``max_physical_batch_size``) are set by the callback before the
    private loader is built.
    """

    def __init__(self, grad_sample_mode: str, max_grad_norm: float) -> None:
        self.grads = PerSampleGradients(grad_sample_mode, max_grad_norm=max_grad_norm, optimizer_params=self.dp_params)
        # every hooked layer sees the batch: broadcast index inputs expanded, other broadcasts refused
        self.alignment = BatchAlignment(self._recording, refuse_reuse=lambda: self.grads.mode == "ghost")
        self.optimizer: Optional[DPOptimizer] = None
        self.accumulate = 1
        self.physical_parts = 1
        self.active = False  # attached to a fit now
        #: hooks of other callbacks run between the clipped sum and the noise, by owner (PrivacyAudit)
        self.before_noise: dict[int, Callable[[DPOptimizer], None]] = {}
        self._loader_ids: set[int] = set()

    def _recording(self) -> bool:
        return self.grads.recording  # Opacus's hooks enabled, or the bk mode's recording (not paused)

    def _run_before_noise(self, optimizer: DPOptimizer) -> None:
        for hook in list(self.before_noise.values()):
            hook(optimizer)

    def dp_params(self) -> list[nn.Parameter]:
        """The DP optimizer's parameters (none before it is built)."""
        return list(self.optimizer.params) if self.optimizer is not None else []

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Extra passes that leave no trace in the per-sample gradient state."""
        with self.grads.paused():
            yield

    # ------------------------------------------------------------------ attach and restore
    def attach(self, trainer: pl.Trainer, module: nn.Module, owner: Any, wrap: Callable[[Any], Any]) -> None:
        """Hook ``module`` and make the fit loop train on ``wrap(user's train loader)``."""
        self.active = True
        self.grads.attach(module)
        self.alignment.attach(module)
        private_loader.install(trainer, owner, wrap, lambda dl: id(dl) in self._loader_ids)

    def wrap(
        self,
        trainer: pl.Trainer,
        optimizer: Optimizer,
        clip_norms: Union[float, list[float]],
        noise_multiplier: float,
        expected_batch_size: float,
        clipping: str,
        distributed: bool,
        secure_rng: bool,
        step_hook: Callable[[DPOptimizer], None],
    ) -> None:
        """Give the Trainer ``optimizer`` in Opacus's ``DPOptimizer`` (``expected_batch_size``: per logical batch)."""
        self.optimizer = wrap_optimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip_norms,
            expected_batch_size=expected_batch_size / self.accumulate,
            clipping=clipping,
            distributed=distributed,
            grad_sample_mode=self.grads.mode,
            secure_rng=secure_rng,
            step_hook=step_hook,
        )
        if self.before_noise:
            add_before_noise(self.optimizer, self._run_before_noise)
        if isinstance(clip_norms, (int, float)):
            self.grads.set_max_grad_norm(float(clip_norms))
        trainer.strategy.optimizers = [self.optimizer]

    def poisson_loader(
        self,
        trainer: pl.Trainer,
        loader: Any,
        sample_rate: float,
        secure_rng: bool,
        max_physical_batch_size: Optional[int],
        dataset_size: int,
    ) -> Any:
        """The Poisson-sampled loader for ``loader`` (remembered as private: no sampler is injected)."""
        dp_loader = private_loader.poisson_loader(
            loader,
            sample_rate,
            private_loader.sampling_generator(trainer.global_rank, secure_rng),
            world_size=int(trainer.world_size),
            max_physical_batch_size=max_physical_batch_size,
            optimizer=self.optimizer,
            physical_parts=self.physical_parts,
            accumulate=self.accumulate,
            dataset_size=dataset_size,
        )
        self._loader_ids.add(id(dp_loader))
        return dp_loader

    def restore(self, trainer: pl.Trainer, owner: Any) -> None:
        """Hooks off, the user's loader and optimizer back, Lightning's DDP all-reduce on again."""
        self.grads.detach()
        self.alignment.detach()
        private_loader.uninstall(trainer, owner)
        if self.optimizer is not None:
            trainer.strategy.optimizers = unwrap_optimizers(trainer.strategy.optimizers)
            self.optimizer = None
        set_ddp_grad_sync(trainer.strategy.model, True)
        self.active = False

    # ------------------------------------------------------------------ training steps
    def begin_batch(self, trainer: pl.Trainer, module: nn.Module) -> None:
        """Before a training batch: follow a changed structure; DDP's own all-reduce off (one noisy one only)."""
        self.grads.begin_batch()
        self.alignment.begin_batch()
        if self.grads.structure_changed(module):
            self.follow_structure(module)
        set_ddp_grad_sync(trainer.strategy.model, False)

    def follow_structure(self, module: nn.Module) -> None:
        """The module's parameters were replaced (structural pruning): hook the new structure and
        check the DP optimizer holds the new parameters."""
        self.grads.reattach(module)
        self.alignment.attach(module)
        if self.optimizer is not None:
            check_holds_parameters(self.optimizer, module)
            rank_zero_info(
                "DifferentialPrivacy: the module's parameters changed (structural pruning); re-attached Opacus's hooks."
            )

    def before_optimizer_step(self) -> None:
        """Lightning divided the loss by ``accumulate_grad_batches``; clip the true per-sample gradients."""
        if self.accumulate > 1 and self.optimizer is not None:
            scale_grad_samples(self.optimizer, self.accumulate)
