"""DP-SGD for any LightningModule: the :class:`DifferentialPrivacy` callback, built on Opacus.

How Opacus is attached to an unchanged LightningModule:

* ``setup``: the module is validated with Opacus's ``ModuleValidator`` (BatchNorm and other
  DP-incompatible layers are refused, or replaced with ``fix_module=True``) before
  ``configure_optimizers`` builds the optimizer from its parameters.
* ``on_fit_start``: Opacus's ``GradSampleHooks`` (the hook half of ``GradSampleModule``, no wrapper)
  are attached to the module, so the user's ``self(x)`` inside ``training_step`` records per-sample
  gradients. The fit loop's train-data source is wrapped so the user's DataLoader is replaced by its
  Poisson-sampled equivalent (Opacus's ``DPDataLoader``, distributed-aware under DDP), keeping the
  dataset, ``collate_fn`` and workers.
* When that loader is built, the sample rate and planned steps are known: the noise multiplier is
  resolved (``get_noise_multiplier`` for a target ε), and the optimizer the Trainer got from
  ``configure_optimizers`` is wrapped in Opacus's ``DPOptimizer`` (``DistributedDPOptimizer`` under
  DDP, per-layer and fast-gradient-clipping variants as configured) whose step hook feeds the
  accountant.
* When another callback replaces the module's parameters (structural pruning swaps each pruned
  ``nn.Parameter`` for a smaller one), the next training batch finds parameters the hooks have not
  seen: the hooks are re-attached to the new structure (Opacus validates it again) and the DP
  optimizer is checked to hold none of the replaced parameters, so clipping and noise cover the
  pruned model.
* Under DDP, Lightning's own DDP gradient all-reduce is switched off for every training step
  (``require_backward_grad_sync = False``): the ``DistributedDPOptimizer`` clips locally, adds noise
  on rank 0 only and all-reduces the noisy sum once. Lightning's all-reduce of the raw, unclipped
  gradients would be thrown away anyway; skipping it avoids a second all-reduce per step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from lightning_trust.privacy.samplers import AccumulationSampler, EvenDistributedPoissonSampler, VirtualBatchSampler
from lightning_trust.core import artifact_dir, new_figure, save_figure, write_json

ACCOUNTANTS = ("prv", "rdp", "gdp")
CLIPPINGS = ("flat", "per_layer")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")
# per-parameter / per-module state Opacus keeps between a forward and the optimizer step
_PARAM_ATTRS = ("grad_sample", "_current_grad_sample", "_forward_counter", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")
_MISSING = object()


def _same_objects(first: list[Any], second: list[Any]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


class _SafeHooks(GradSampleHooks):
    """Opacus's hooks, except that a backward pass with no recorded forward (eval mode, grads on, as in
    an attribution run outside :meth:`DifferentialPrivacy.paused`) is ignored instead of failing."""

    def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if not getattr(module, "activations", None):
            return
        super().capture_backprops_hook(module, *args, **kwargs)


class _SafeGhostHooks(GradSampleHooksFastGradientClipping):
    """Opacus's fast-gradient-clipping hooks with the same guard as :class:`_SafeHooks`."""

    def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if not getattr(module, "activations", None):
            return
        super().capture_backprops_hook(module, *args, **kwargs)


class _PrivateTrainSource(_DataLoaderSource):
    """The fit loop's train-data source, returning the callback's private version of the user's loader."""

    def __init__(self, inner: _DataLoaderSource, callback: DifferentialPrivacy, trainer: pl.Trainer) -> None:
        super().__init__(inner.instance, inner.name)
        self.inner = inner
        self.callback = callback
        self.trainer = trainer

    def dataloader(self) -> Any:
        return self.callback._private_loader(self.trainer, self.inner.dataloader())


class DifferentialPrivacy(Callback):
    r"""Train an unchanged LightningModule with differentially private SGD (Opacus).

    Per-sample gradients are clipped to ``max_grad_norm``, Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` is added once per (logical) batch, batches are Poisson
    sampled, and the privacy loss is tracked by an Opacus accountant. ε is logged as
    ``privacy/epsilon`` (with ``privacy/delta`` and ``privacy/noise_multiplier``) every
    ``log_every_n_steps`` noisy steps, exposed as :attr:`epsilon_spent` and in :meth:`report`.

    Args:
        target_epsilon: the ε to reach at the end of the planned training (``max_epochs`` /
            ``max_steps``); the noise multiplier is computed from it. Exclusive with ``noise_multiplier``.
        target_delta: δ. Default ``1 / N`` (N = training set size). That is the loosest value with any
            meaning; for a real guarantee use δ well below ``1 / N`` (say ``1e-5`` for N ≈ 30,000).
        noise_multiplier: a fixed noise multiplier σ (instead of a target ε). ``0`` disables noise
            (clipping only, ε infinite): for debugging only.
        max_grad_norm: per-sample clipping bound C. With ``clipping="per_layer"`` a list (one per
            parameter, in optimizer order) or one number split evenly (``C / sqrt(#params)`` each).
        accountant: ``"prv"`` (default, tightest), ``"rdp"`` or ``"gdp"``.
        poisson_sampling: replace the train loader by Opacus's Poisson-sampled one (required for the
            guarantee). ``False`` keeps the user's shuffled loader; the report then says the guarantee
            assumes Poisson sampling that was not done.
        clipping: ``"flat"`` (one bound for the whole gradient) or ``"per_layer"``.
        grad_sample_mode: ``"hooks"`` (Opacus's per-layer grad samplers), ``"functorch"`` (functorch for
            every layer) or ``"ghost"`` (fast gradient clipping: per-sample norms without per-sample
            gradients, then a second backward; the loss must be computed from the module's own output).
        max_physical_batch_size: split each logical (Poisson) batch into a fixed number of physical
            batches of at most this size (memory; unless the Poisson draw is > 3 standard deviations above
            its mean), clipped and accumulated one by one, with one noisy step per logical batch.
            Lightning's ``global_step`` (and ``max_steps``) then counts physical batches.
        secure_rng: cryptographically secure noise and sampling (needs ``torchcsprng``).
        fix_module: replace BatchNorm and other DP-incompatible layers with Opacus's ``ModuleValidator``
            fixes. Without it such a model is refused with the list of offending layers.
        stop_at_epsilon: stop cleanly (saving a checkpoint) before a step would exceed this ε.
            Default: ``target_epsilon``. ``None`` with a fixed ``noise_multiplier``: never stop.
        epsilon_tolerance: precision of the noise-multiplier search (Opacus's ``epsilon_tolerance``).
        dataset_size: the training set size N, for datasets without ``len`` (``IterableDataset``).
        log_every_n_steps: compute and log ε every this many noisy steps (default: the Trainer's).

    Resuming: the accountant history, noise multiplier, sample rate, δ and the ε curve are saved in
    the checkpoint, so a resumed run continues the same ε curve. A DP checkpoint loaded without this
    callback makes Lightning warn that the ``DifferentialPrivacy`` state is unused; training on from it
    without the callback is not private, and a later private run would not count the earlier steps.

    Example:
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5)])
        >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
        >>> trainer.callbacks[0].epsilon_spent  # doctest: +SKIP
        2.98
    """

    report_section = "privacy"

    def __init__(
        self,
        target_epsilon: Optional[float] = None,
        target_delta: Optional[float] = None,
        noise_multiplier: Optional[float] = None,
        max_grad_norm: Union[float, list[float]] = 1.0,
        accountant: Literal["prv", "rdp", "gdp"] = "prv",
        poisson_sampling: bool = True,
        clipping: Literal["flat", "per_layer"] = "flat",
        grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks",
        max_physical_batch_size: Optional[int] = None,
        secure_rng: bool = False,
        fix_module: bool = False,
        stop_at_epsilon: Optional[float] = None,
        epsilon_tolerance: float = 0.01,
        dataset_size: Optional[int] = None,
        log_every_n_steps: Optional[int] = None,
    ) -> None:
        super().__init__()
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError(
                "DifferentialPrivacy needs exactly one of `target_epsilon` (the noise is computed from it) or "
                f"`noise_multiplier` (fixed noise); got target_epsilon={target_epsilon}, noise_multiplier={noise_multiplier}."
            )
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"`target_epsilon` must be > 0, got {target_epsilon}.")
        if noise_multiplier is not None and not noise_multiplier >= 0:
            raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier}.")
        if target_delta is not None and not 0 < target_delta < 1:
            raise ValueError(f"`target_delta` must be in (0, 1), got {target_delta}; a typical value is 1e-5.")
        norms = max_grad_norm if isinstance(max_grad_norm, (list, tuple)) else [max_grad_norm]
        if not norms or any(not isinstance(c, (int, float)) or not c > 0 for c in norms):
            raise ValueError(f"`max_grad_norm` must be a positive number (or a list of them), got {max_grad_norm}.")
        if isinstance(max_grad_norm, (list, tuple)) and clipping != "per_layer":
            raise ValueError("A list `max_grad_norm` (one bound per parameter) needs `clipping='per_layer'`.")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
        if clipping not in CLIPPINGS:
            raise ValueError(f"`clipping` must be one of {CLIPPINGS}, got {clipping!r}.")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
        if grad_sample_mode == "ghost" and clipping != "flat":
            raise ValueError("Opacus's ghost clipping supports only `clipping='flat'`; use grad_sample_mode='hooks'.")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"`max_physical_batch_size` must be a positive integer, got {max_physical_batch_size}.")
        if max_physical_batch_size is not None and not poisson_sampling:
            raise ValueError("`max_physical_batch_size` splits Poisson batches; it needs `poisson_sampling=True`.")
        if stop_at_epsilon is not None and not stop_at_epsilon > 0:
            raise ValueError(f"`stop_at_epsilon` must be > 0, got {stop_at_epsilon}.")
        if not epsilon_tolerance > 0:
            raise ValueError(f"`epsilon_tolerance` must be > 0, got {epsilon_tolerance}.")
        if dataset_size is not None and dataset_size < 1:
            raise ValueError(f"`dataset_size` must be a positive integer, got {dataset_size}.")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"`log_every_n_steps` must be a positive integer, got {log_every_n_steps}.")
        if secure_rng and importlib.util.find_spec("torchcsprng") is None:
            raise ValueError(
                "`secure_rng=True` needs cryptographically secure randomness from `torchcsprng` "
                "(`pip install torchcsprng`); it is not installed. Set `secure_rng=False` to use torch's RNG."
            )

        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.max_grad_norm = list(max_grad_norm) if isinstance(max_grad_norm, (list, tuple)) else float(max_grad_norm)
        self.accountant = accountant
        self.poisson_sampling = poisson_sampling
        self.clipping = clipping
        self.grad_sample_mode = grad_sample_mode
        self.max_physical_batch_size = max_physical_batch_size
        self.secure_rng = secure_rng
        self.fix_module = fix_module
        self.stop_at_epsilon = stop_at_epsilon if stop_at_epsilon is not None else target_epsilon
        self.epsilon_tolerance = epsilon_tolerance
        self.dataset_size = dataset_size
        self.log_every_n_steps = log_every_n_steps

        # resolved when the private loader is built
        self.noise_multiplier: Optional[float] = noise_multiplier
        self.delta: Optional[float] = target_delta
        self.sample_rate: Optional[float] = None
        self.expected_batch_size: Optional[float] = None
        self.planned_steps: Optional[int] = None
        self.num_samples: Optional[int] = None
        self.world_size = 1
        self.stopped_at_budget = False
        self.checkpoint_path: Optional[str] = None
        self.figures: dict[str, str] = {}

        self._accountant: Any = create_accountant(accountant)
        self._curve: list[tuple[int, float]] = []
        self._restored: Optional[dict[str, Any]] = None
        self._hooks: Optional[GradSampleHooks] = None
        self._hooked_params: list[nn.Parameter] = []
        self._module: Optional[pl.LightningModule] = None
        self._optimizer: Optional[DPOptimizer] = None
        self._max_total_steps: Optional[int] = None
        self._accumulate = 1
        self._physical_parts = 1
        self._remaining: Optional[int] = None
        self._pause_depth = 0
        self._epsilon_cache: tuple[int, float] = (0, 0.0)
        self._last_seen_steps = 0
        self._saved_source: Optional[_DataLoaderSource] = None
        self._patched_connector: Any = None
        self._ghost_outputs: list[Tensor] = []
        self._ghost_handle: Any = None
        self._loader_ids: set[int] = set()

    # ------------------------------------------------------------------ public read-outs
    @property
    def steps(self) -> int:
        """Noisy optimizer steps accounted so far (resumed runs included)."""
        return int(sum(entry[2] for entry in self._accountant.history))

    @property
    def epsilon_spent(self) -> float:
        """ε spent so far at :attr:`delta` (0 before the first step, ``inf`` with no noise)."""
        steps = self.steps
        if self._epsilon_cache[0] != steps:
            self._epsilon_cache = (steps, self._epsilon_of(self._accountant.history))
        return self._epsilon_cache[1]

    def report(self) -> dict[str, Any]:
        """Plain-JSON summary for the standards report (section ``privacy``)."""
        sampling = "poisson" if self.poisson_sampling else "shuffle"
        guarantee = (
            f"({self.epsilon_spent:.4g}, {self.delta:.3g})-DP for the training examples"
            if self.delta is not None
            else "not trained yet"
        )
        if not self.poisson_sampling:
            guarantee += " assuming Poisson sampling; batches were shuffled instead, so the bound is not proven"
        return {
            "mechanism": "subsampled_gaussian",
            "accountant": self.accountant,
            "epsilon": float(self.epsilon_spent),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm if isinstance(self.max_grad_norm, float) else float(
                math.sqrt(sum(c * c for c in self.max_grad_norm))
            ),
            "steps": self.steps,
            "sample_rate": self.sample_rate,
            "sampling": sampling,
            "target_epsilon": self.target_epsilon,
            "stop_at_epsilon": self.stop_at_epsilon,
            "stopped_at_budget": self.stopped_at_budget,
            "clipping": self.clipping,
            "grad_sample_mode": self.grad_sample_mode,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.num_samples,
            "world_size": self.world_size,
            "planned_steps": self.planned_steps,
            "secure_rng": self.secure_rng,
            "guarantee": guarantee,
            "epsilon_curve": [[s, e] for s, e in self._curve],
            "figures": dict(self.figures),
        }

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run extra forward/backward passes that leave no trace in DP state.

        Inside, Opacus's hooks record nothing, and the per-sample gradient state (``grad_sample``,
        ``_current_grad_sample``, ``_norm_sample``, ``summed_grad``, activations) is restored on exit;
        the accountant only moves on optimizer steps, so it is untouched too. Re-entrant.
        Use it through :func:`lightning_trust.core.isolated_eval`.
        """
        hooks, module = self._hooks, self._module
        if hooks is None or module is None or self._pause_depth > 0:
            self._pause_depth += 1
            try:
                yield
            finally:
                self._pause_depth -= 1
            return
        was_enabled = hooks.hooks_enabled
        saved_params = [(p, {a: getattr(p, a, _MISSING) for a in _PARAM_ATTRS}) for p in module.parameters()]
        saved_modules = []
        for m in module.modules():
            state = {a: getattr(m, a, _MISSING) for a in _MODULE_ATTRS}
            if isinstance(state["activations"], list):
                state["activations"] = list(state["activations"])
            saved_modules.append((m, state))
        saved_outputs = list(self._ghost_outputs)
        self._pause_depth += 1
        hooks.disable_hooks()
        try:
            yield
        finally:
            self._pause_depth -= 1
            for obj, state in saved_params + saved_modules:
                for name, value in state.items():
                    if value is _MISSING:
                        if name in obj.__dict__:
                            delattr(obj, name)
                    else:
                        setattr(obj, name, value)
            self._ghost_outputs = saved_outputs
            if was_enabled:
                hooks.enable_hooks()

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"DifferentialPrivacy supports single-device and DDP training, not {type(trainer.strategy).__name__}; "
                "use `strategy='ddp'` (or 'auto' on one device)."
            )
        if str(trainer.precision) not in SUPPORTED_PRECISIONS:
            raise ValueError(
                f"DifferentialPrivacy does not support `precision={trainer.precision!r}`: fp16 loss scaling scales the "
                "per-sample gradients before they are clipped, and Opacus has no fp16 grad samplers. "
                f"Use one of {SUPPORTED_PRECISIONS}."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips the summed gradient, which DP-SGD replaces "
                "by per-sample clipping; remove it and set `DifferentialPrivacy(max_grad_norm=...)` instead."
            )
        self._accumulate = int(trainer.accumulate_grad_batches)
        if self._accumulate > 1 and self.grad_sample_mode == "ghost":
            raise ValueError(
                "Opacus's ghost clipping takes one backward pass per optimizer step, so it cannot be combined with "
                f"Trainer(accumulate_grad_batches={self._accumulate}); use grad_sample_mode='hooks' or "
                "`max_physical_batch_size` for memory."
            )
        if self._accumulate > 1 and self.max_physical_batch_size is not None:
            raise ValueError(
                "Use either Trainer(accumulate_grad_batches) or DifferentialPrivacy(max_physical_batch_size) to split "
                "logical batches, not both."
            )
        self._check_module(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is None and trainer.ckpt_path:
            rank_zero_warn(
                f"Resuming from {trainer.ckpt_path}, which holds no DifferentialPrivacy state: the ε reported counts only "
                "the steps from now on, not any training that produced this checkpoint.",
                category=UserWarning,
            )
        self._module = pl_module
        self._attach_hooks(pl_module)
        fit_loop = trainer.fit_loop
        self._saved_source = fit_loop._data_source
        fit_loop._data_source = _PrivateTrainSource(fit_loop._data_source, self, trainer)
        fit_loop._combined_loader = None  # a tuner may have built the plain loader already
        connector = trainer._data_connector
        original = connector._requires_distributed_sampler

        def requires_distributed_sampler(dataloader: Any) -> bool:
            # our Poisson loader is distributed already; Lightning must not inject a DistributedSampler
            return False if id(dataloader) in self._loader_ids else original(dataloader)

        connector._requires_distributed_sampler = requires_distributed_sampler
        self._patched_connector = connector

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._optimizer is None:
            if trainer.limit_train_batches == 0:
                return
            raise RuntimeError("DifferentialPrivacy did not see the train dataloader; cannot train privately.")
        if self._max_total_steps is not None and self.steps >= self._max_total_steps:
            rank_zero_warn(
                f"The privacy budget ε={self.stop_at_epsilon} is already spent ({self.steps} steps); stopping.",
                category=UserWarning,
            )
            self.stopped_at_budget = True
            trainer.should_stop = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._max_total_steps is not None and self.steps >= self._max_total_steps:
            raise RuntimeError(
                f"Another noisy step would exceed stop_at_epsilon={self.stop_at_epsilon}, but the Trainer keeps training "
                "(min_epochs / min_steps?). Refusing to exceed the privacy budget; lower min_epochs/min_steps."
            )
        self._ghost_outputs = []
        if self._hooks is not None and not _same_objects(self._hooked_params, list(pl_module.parameters())):
            self._reattach_hooks(pl_module)
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = False  # see the module docstring: one (noisy) all-reduce only

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._accumulate > 1 and self._optimizer is not None:
            # Lightning divided the loss by accumulate_grad_batches; clip the true per-sample gradients
            for p in self._optimizer.params:
                samples = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]
                for g in samples:
                    if g is not None:
                        g.mul_(self._accumulate)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        steps = self.steps
        if steps == self._last_seen_steps:
            return
        self._last_seen_steps = steps
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if steps % every == 0:
            self._log(pl_module, steps)
        if self._max_total_steps is not None and steps >= self._max_total_steps and not self.stopped_at_budget:
            self._stop_at_budget(trainer, pl_module, steps)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = self.steps
        if steps and (not self._curve or self._curve[-1][0] != steps):
            self._curve.append((steps, self.epsilon_spent))
        folder = artifact_dir(trainer, "privacy")
        if self._curve and trainer.is_global_zero:
            path = folder / "epsilon_curve.png"
            save_figure(trainer, self._figure(), path, tag="privacy/epsilon_curve")
            self.figures["epsilon_curve"] = str(path)
        write_json(folder / "privacy.json", self.report())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._module is not None:
            self.teardown(trainer, pl_module, "fit")  # leave the user's module and Trainer as they were

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._detach_hooks(pl_module)
        if self._ghost_handle is not None:
            self._ghost_handle.remove()
            self._ghost_handle = None
            pl_module.__dict__.pop("backward", None)
        if self._saved_source is not None:
            trainer.fit_loop._data_source = self._saved_source
            self._saved_source = None
        if self._patched_connector is not None:
            self._patched_connector.__dict__.pop("_requires_distributed_sampler", None)
            self._patched_connector = None
        if self._optimizer is not None:
            trainer.strategy.optimizers = [
                opt.original_optimizer if isinstance(opt, DPOptimizer) else opt for opt in trainer.strategy.optimizers
            ]
            self._optimizer = None
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = True
        self._module = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": dict(self._accountant.state_dict()),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "dataset_size": self.num_samples,
            "max_grad_norm": self.max_grad_norm,
            "curve": [list(point) for point in self._curve],
            "stopped_at_budget": self.stopped_at_budget,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mechanism = state_dict["accountant"].get("mechanism")
        if mechanism != self.accountant:
            raise ValueError(
                f"The checkpoint's privacy accounting used the {mechanism!r} accountant, this callback {self.accountant!r}; "
                f"set `accountant={mechanism!r}` to continue the same budget."
            )
        self._restored = dict(state_dict)
        self._accountant.load_state_dict(state_dict["accountant"])
        self._accountant.history = [tuple(entry) for entry in self._accountant.history]
        self._curve = [(int(s), float(e)) for s, e in state_dict.get("curve", [])]
        if self.target_epsilon is not None or self.noise_multiplier is None:
            self.noise_multiplier = state_dict["noise_multiplier"]  # the noise planned for this run's target
        elif self.noise_multiplier != state_dict["noise_multiplier"]:
            rank_zero_warn(
                f"Resuming with noise_multiplier={self.noise_multiplier}; the checkpoint's steps used "
                f"{state_dict['noise_multiplier']}. The accountant composes both.",
                category=UserWarning,
            )
        self.delta = state_dict["delta"]
        self._last_seen_steps = self.steps

    # ------------------------------------------------------------------ internals
    def _check_module(self, pl_module: pl.LightningModule) -> None:
        errors = [e for e in ModuleValidator.validate(pl_module, strict=False) if "training mode" not in str(e)]
        if errors and self.fix_module:
            for name, child in list(pl_module.named_children()):
                if [e for e in ModuleValidator.validate(child, strict=False) if "training mode" not in str(e)]:
                    setattr(pl_module, name, ModuleValidator.fix(child))
            errors = [e for e in ModuleValidator.validate(pl_module, strict=False) if "training mode" not in str(e)]
            rank_zero_info("DifferentialPrivacy: replaced DP-incompatible layers with Opacus's ModuleValidator fixes.")
        if errors:
            listing = "\n".join(f"  - {e}" for e in errors)
            raise ValueError(
                f"{type(pl_module).__name__} has layers that break per-sample gradients (DP-SGD):\n{listing}\n"
                "Set `DifferentialPrivacy(fix_module=True)` to replace them (BatchNorm -> GroupNorm, ...) before the "
                "optimizer is built, or change the model."
            )

    def _attach_hooks(self, pl_module: pl.LightningModule) -> None:
        if self._hooks is not None:
            return
        common = {"batch_first": True, "loss_reduction": "mean", "strict": True}
        # torch warns when a hooked first layer gets an input without grad; that is the normal case here
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        try:
            if self.grad_sample_mode == "ghost":
                norm = self.max_grad_norm if isinstance(self.max_grad_norm, float) else 1.0
                self._hooks = _SafeGhostHooks(pl_module, max_grad_norm=norm, use_ghost_clipping=True, **common)
                if self._ghost_handle is None:
                    self._ghost_handle = pl_module.register_forward_hook(self._capture_output)
                    pl_module.backward = partial(self._ghost_backward, pl_module)  # instance attribute, removed at teardown
            else:
                self._hooks = _SafeHooks(pl_module, force_functorch=self.grad_sample_mode == "functorch", **common)
        except (NotImplementedError, ValueError) as err:
            raise ValueError(f"Opacus cannot compute per-sample gradients of {type(pl_module).__name__}: {err}") from err
        self._hooked_params = list(pl_module.parameters())

    def _detach_hooks(self, pl_module: pl.LightningModule) -> None:
        if self._hooks is None:
            return
        self._hooks.cleanup()
        for m in pl_module.modules():
            for name in _MODULE_ATTRS:
                if name in m.__dict__:
                    delattr(m, name)
        for p in list(pl_module.parameters()) + self._hooked_params:
            for name in _PARAM_ATTRS:
                if name in p.__dict__:
                    delattr(p, name)
        self._hooks = None
        self._hooked_params = []

    def _reattach_hooks(self, pl_module: pl.LightningModule) -> None:
        """The module's parameters were replaced (structural pruning): hook the new structure."""
        self._detach_hooks(pl_module)
        self._attach_hooks(pl_module)  # Opacus's strict validation runs on the new structure here
        if self._optimizer is None:
            return
        current = {id(p) for p in pl_module.parameters()}
        stale = [p for p in self._optimizer.params if id(p) not in current]
        if stale:
            raise RuntimeError(
                f"The module's parameters were replaced during training, but the DP optimizer still holds {len(stale)} "
                "of the old ones: their clipped, noised gradients would not reach the model. A callback that changes the "
                "model's structure must point the optimizer's param_groups at the new parameters (as "
                "ProgressivePruning does)."
            )
        rank_zero_info("DifferentialPrivacy: the module's parameters changed (structural pruning); re-attached Opacus's hooks.")

    def _private_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        """Build the Poisson-sampled loader for ``loader`` and, the first time, the DP optimizer."""
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"DifferentialPrivacy needs exactly one train DataLoader, got {type(loader).__name__}; "
                "combine several datasets into one Dataset first."
            )
        dataset = loader.dataset
        iterable = isinstance(dataset, IterableDataset)
        if iterable and self.poisson_sampling:
            raise ValueError(
                f"The train loader reads an IterableDataset ({type(dataset).__name__}), which cannot be Poisson sampled, "
                "and the DP guarantee assumes Poisson sampling. Use a map-style Dataset, or accept a guarantee that "
                "assumes shuffling with `DifferentialPrivacy(poisson_sampling=False, dataset_size=N)`."
            )
        size = self.dataset_size
        if size is None:
            try:
                size = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                size = None
        if size is None and self.target_delta is None and self.delta is None:
            raise ValueError(
                "No `target_delta` was given and the training set size is unknown (the dataset has no len), so the "
                "default δ = 1/N cannot be set. Pass `target_delta` (e.g. 1e-5) or `dataset_size`."
            )
        if size is None:
            raise ValueError(
                "The training set size N is needed for the sample rate; pass `DifferentialPrivacy(dataset_size=N)`."
            )
        batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        if not batch_size:
            raise ValueError("The train DataLoader needs a `batch_size` (the expected Poisson batch size).")
        world = int(trainer.world_size)
        sample_rate = 1.0 / math.ceil(size / (batch_size * world * self._accumulate))
        if self.sample_rate is None:
            self._resolve(trainer, size, sample_rate, world)
        elif sample_rate != self.sample_rate or size != self.num_samples:
            raise ValueError(
                f"The train loader gives sample rate {sample_rate} over N={size}, the first gave "
                f"{self.sample_rate} over N={self.num_samples}; keep batch size and dataset fixed under DP."
            )
        if self._optimizer is None:  # first loader of this fit
            self._plan(trainer)
            self._wrap_optimizer(trainer)
            self._max_total_steps = self._budget_steps()
        if not self.poisson_sampling:
            return loader
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + trainer.global_rank)
        if self.secure_rng:
            import torchcsprng

            generator = torchcsprng.create_random_device_generator("/dev/urandom")
        options = {
            "num_workers": loader.num_workers,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "persistent_workers": loader.persistent_workers,
        }
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        dp_loader = DPDataLoader(
            dataset, sample_rate=self.sample_rate, collate_fn=loader.collate_fn, generator=generator,
            distributed=world > 1, **options,
        )
        batch_sampler: Any = dp_loader.batch_sampler
        if world > 1:
            batch_sampler = EvenDistributedPoissonSampler(
                total_size=size, sample_rate=self.sample_rate, generator=generator
            )
        if self.max_physical_batch_size is not None:
            batch_sampler = VirtualBatchSampler(
                sampler=batch_sampler, max_batch_size=self.max_physical_batch_size, optimizer=self._optimizer,
                parts=self._physical_parts,
            )
        elif self._accumulate > 1:
            batch_sampler = AccumulationSampler(batch_sampler, self._accumulate)
        if batch_sampler is not dp_loader.batch_sampler:
            dp_loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=dp_loader.collate_fn, **options)
        self._loader_ids.add(id(dp_loader))
        return dp_loader

    def _resolve(self, trainer: pl.Trainer, size: int, sample_rate: float, world: int) -> None:
        """Fix N, q, δ and the expected batch size (first loader this callback sees)."""
        self.num_samples, self.sample_rate, self.world_size = size, sample_rate, world
        restored = self._restored or {}
        if restored and restored.get("sample_rate") not in (None, sample_rate):
            rank_zero_warn(
                f"The sample rate changed from {restored['sample_rate']} (checkpoint) to {sample_rate}; the accountant "
                "composes both.",
                category=UserWarning,
            )
        if self.delta is None:
            self.delta = 1.0 / size
            rank_zero_info(
                f"DifferentialPrivacy: target_delta defaults to 1/N = {self.delta:.3g}; set a smaller δ (e.g. 1e-5) "
                "for a meaningful guarantee."
            )
        self.expected_batch_size = sample_rate * size / world
        if self.max_physical_batch_size is not None:
            self._physical_parts = VirtualBatchSampler.parts_for(self.expected_batch_size, self.max_physical_batch_size)

    def _remaining_steps(self, trainer: pl.Trainer) -> Optional[int]:
        """Noisy steps this fit can still take at most (``None``: unbounded)."""
        limits = []
        if trainer.max_steps is not None and trainer.max_steps > 0:
            # global_step is restored on resume; it counts physical batches with virtual batching
            limits.append(max(int(trainer.max_steps) - trainer.global_step, 0) // self._physical_parts)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            steps_per_epoch = int(1 / self.sample_rate)  # type: ignore[operator]
            limits.append(max(int(trainer.max_epochs) - trainer.current_epoch, 0) * steps_per_epoch)
        return min(limits) if limits else None

    def _plan(self, trainer: pl.Trainer) -> None:
        """Planned steps of this fit and, for a target ε, the noise multiplier that reaches it."""
        remaining = self._remaining_steps(trainer)
        self._remaining = remaining
        self.planned_steps = None if remaining is None else self.steps + remaining
        sample_rate = self.sample_rate
        if self.noise_multiplier is None:
            if remaining is None:
                raise ValueError(
                    "`target_epsilon` needs a planned training length to find the noise: set Trainer(max_epochs=...) "
                    "or Trainer(max_steps=...), or give `noise_multiplier` instead."
                )
            try:
                self.noise_multiplier = float(
                    get_noise_multiplier(
                        target_epsilon=self.target_epsilon,
                        target_delta=self.delta,
                        sample_rate=sample_rate,
                        steps=remaining,
                        accountant=self.accountant,
                        epsilon_tolerance=self.epsilon_tolerance,
                    )
                )
            except ValueError as err:
                raise ValueError(
                    f"target_epsilon={self.target_epsilon} at δ={self.delta:.3g} cannot be reached in "
                    f"{remaining} steps at sample rate {sample_rate:.4g} ({err}): no noise multiplier is large "
                    "enough. Raise target_epsilon or target_delta, train fewer steps/epochs, or use a smaller batch."
                ) from err
        elif self.noise_multiplier == 0:
            rank_zero_warn("DifferentialPrivacy(noise_multiplier=0): no noise, ε is infinite (debugging only).")
        rank_zero_info(
            f"DifferentialPrivacy: N={self.num_samples}, sample rate {sample_rate:.4g}, noise multiplier "
            f"{self.noise_multiplier:.4g}, max_grad_norm {self.max_grad_norm}, {self.accountant} accountant, "
            f"planned steps {self.planned_steps}."
        )

    def _wrap_optimizer(self, trainer: pl.Trainer) -> None:
        optimizers = [opt.original_optimizer if isinstance(opt, DPOptimizer) else opt for opt in trainer.strategy.optimizers]
        if len(optimizers) != 1:
            raise ValueError(
                f"DifferentialPrivacy wraps one optimizer; configure_optimizers returned {len(optimizers)}. Use one "
                "optimizer with several param groups."
            )
        optimizer = optimizers[0]
        mode = "ghost" if self.grad_sample_mode == "ghost" else "hooks"
        cls = get_optimizer_class(clipping=self.clipping, distributed=self.world_size > 1, grad_sample_mode=mode)
        max_grad_norm: Any = self.max_grad_norm
        if self.clipping == "per_layer":
            count = sum(len(group["params"]) for group in optimizer.param_groups)
            if isinstance(max_grad_norm, list):
                if len(max_grad_norm) != count:
                    raise ValueError(f"`max_grad_norm` lists {len(max_grad_norm)} bounds for {count} parameters.")
            else:
                max_grad_norm = [max_grad_norm / math.sqrt(count)] * count
        generator = None
        if self.secure_rng:
            import torchcsprng

            generator = torchcsprng.create_random_device_generator("/dev/urandom")
        self._optimizer = cls(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=self.expected_batch_size / self._accumulate,
            loss_reduction="mean",
            generator=generator,
            secure_mode=self.secure_rng,
        )
        self._optimizer.attach_step_hook(self._on_noisy_step)
        trainer.strategy.optimizers = [self._optimizer]

    def _on_noisy_step(self, optimizer: DPOptimizer) -> None:
        self._accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)

    def _history_plus(self, extra: int) -> list[tuple[float, float, int]]:
        history = list(self._accountant.history)
        if extra <= 0:
            return history
        if history and history[-1][0] == self.noise_multiplier and history[-1][1] == self.sample_rate:
            sigma, rate, count = history[-1]
            return history[:-1] + [(sigma, rate, count + extra)]
        return history + [(self.noise_multiplier, self.sample_rate, extra)]

    def _epsilon_of(self, history: list[tuple[float, float, int]]) -> float:
        if not history or self.delta is None:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return math.inf
        accountant = create_accountant(self.accountant)
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=self.delta))

    def _budget_steps(self) -> Optional[int]:
        """Total noisy steps allowed by ``stop_at_epsilon`` (``None``: no limit within the plan)."""
        if self.stop_at_epsilon is None:
            return None
        limit, taken = self.stop_at_epsilon, self.steps
        if self.noise_multiplier == 0:
            return taken
        remaining = self._remaining
        if remaining is not None and self._epsilon_of(self._history_plus(remaining)) <= limit:
            return None
        if self._epsilon_of(self._history_plus(1)) > limit:
            return taken
        low, high = 1, 2
        if remaining is None:
            while self._epsilon_of(self._history_plus(high)) <= limit:
                low, high = high, high * 2
                if high > 2**31:
                    return None
        else:
            high = remaining
        while high - low > 1:  # eps(low) <= limit < eps(high)
            mid = (low + high) // 2
            if self._epsilon_of(self._history_plus(mid)) <= limit:
                low = mid
            else:
                high = mid
        return taken + low

    def _log(self, pl_module: pl.LightningModule, steps: int) -> None:
        epsilon = self.epsilon_spent
        self._curve.append((steps, epsilon))
        pl_module.log_dict(
            {
                "privacy/epsilon": epsilon,
                "privacy/delta": float(self.delta or 0.0),
                "privacy/noise_multiplier": float(self.noise_multiplier or 0.0),
            },
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )

    def _stop_at_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule, steps: int) -> None:
        self.stopped_at_budget = True
        trainer.should_stop = True
        if not self._curve or self._curve[-1][0] != steps:
            self._log(pl_module, steps)
        path = artifact_dir(trainer, "privacy") / "budget_reached.ckpt"
        trainer.save_checkpoint(path)
        self.checkpoint_path = str(path)
        rank_zero_info(
            f"DifferentialPrivacy: ε={self.epsilon_spent:.4g} after {steps} steps; one more step would exceed "
            f"stop_at_epsilon={self.stop_at_epsilon}. Stopping; checkpoint saved to {path}."
        )

    def _figure(self) -> Any:
        fig = new_figure(figsize=(5, 3.2))
        ax = fig.add_subplot(1, 1, 1)
        curve = self._curve if self._curve[0][0] == 0 else [(0, 0.0)] + self._curve
        steps, eps = zip(*curve)
        ax.plot(steps, eps, marker="o", markersize=3, label=f"ε ({self.accountant}, δ={self.delta:.2g})")
        if self.stop_at_epsilon is not None:
            ax.axhline(self.stop_at_epsilon, color="tab:red", linestyle="--", label="budget")
        ax.set_xlabel("noisy steps")
        ax.set_ylabel("ε")
        ax.set_title(f"Privacy spent (σ={self.noise_multiplier:.3g}, q={self.sample_rate:.3g})")
        ax.legend(loc="lower right")
        return fig

    # ------------------------------------------------------------------ ghost clipping
    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._pause_depth or not module.training or not torch.is_grad_enabled():
            return
        # dim >= 1: under DDP Lightning routes training_step itself through the module's __call__, and its
        # scalar loss must not count as a model output; each tensor once
        seen = {id(t) for t in self._ghost_outputs}
        for tensor in _tensors(output):
            if tensor.requires_grad and tensor.dim() >= 1 and id(tensor) not in seen:
                self._ghost_outputs.append(tensor)
                seen.add(id(tensor))

    def _ghost_backward(self, pl_module: pl.LightningModule, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        outputs, self._ghost_outputs = self._ghost_outputs, []
        if self._pause_depth or self._hooks is None:
            loss.backward(*args, **kwargs)
            return
        if not outputs:
            raise RuntimeError(
                "grad_sample_mode='ghost' needs the loss to be computed from the module's own output in "
                "training_step (`logits = self(x)`); none was recorded. Use grad_sample_mode='hooks'."
            )
        grads: list[Optional[Tensor]] = [None] * len(outputs)

        def keep(index: int, grad: Tensor) -> None:
            grads[index] = grad

        handles = [out.register_hook(partial(keep, i)) for i, out in enumerate(outputs)]
        try:
            loss.backward(retain_graph=True)  # first pass: the hooks compute per-sample gradient norms
        finally:
            for handle in handles:
                handle.remove()
        assert self._optimizer is not None
        for p in self._optimizer.params:
            p.grad = None
        coeff = self._hooks.get_clipping_coef()  # type: ignore[attr-defined]
        batch = coeff.shape[0]
        pairs = []
        for out, grad in zip(outputs, grads):
            if grad is None:
                continue
            if grad.shape[0] != batch:
                raise RuntimeError(
                    f"grad_sample_mode='ghost': a module output has batch size {grad.shape[0]}, the batch {batch}."
                )
            # d(sum_i c_i L_i)/dz_i = c_i * n * d(mean_i L_i)/dz_i
            scale = (coeff * batch).to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
            pairs.append((out, grad * scale))
        self._hooks.disable_hooks()
        try:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        finally:
            self._hooks.enable_hooks()


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


__all__ = ["DifferentialPrivacy"]
