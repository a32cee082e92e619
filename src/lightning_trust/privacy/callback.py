"""DP-SGD for any LightningModule: the :class:`DifferentialPrivacy` callback, built on Opacus.

How Opacus is attached to an unchanged LightningModule:

* ``setup``: the module is validated with Opacus's ``ModuleValidator`` (BatchNorm and other
  DP-incompatible layers are refused, or replaced with ``fix_module=True``) before
  ``configure_optimizers`` builds the optimizer from its parameters.
* ``on_fit_start``: Opacus's ``GradSampleHooks`` (the hook half of ``GradSampleModule``, no wrapper)
  are attached to the module (:mod:`~lightning_trust.privacy.hooks`), so the user's ``self(x)``
  inside ``training_step`` records per-sample gradients. The fit loop's train loader is replaced
  through the seam by its Poisson-sampled equivalent (:mod:`~lightning_trust.privacy.loader`:
  Opacus's ``DPDataLoader``, distributed-aware under DDP), keeping the dataset, ``collate_fn`` and
  workers.
* When that loader is built, the sample rate and planned steps are known: the noise multiplier is
  planned (:meth:`DifferentialPrivacy.noise_plan`, by default Opacus's ``get_noise_multiplier`` for
  a target ε, see :mod:`~lightning_trust.privacy.accounting`), and the optimizer the Trainer got
  from ``configure_optimizers`` is wrapped in Opacus's ``DPOptimizer`` (``DistributedDPOptimizer``
  under DDP, per-layer and fast-gradient-clipping variants as configured, clipping bounds from
  :meth:`DifferentialPrivacy.clip_plan`) whose step hook feeds the accountant.
* When another callback replaces the module's parameters (structural pruning swaps each pruned
  ``nn.Parameter`` for a smaller one), the next training batch finds parameters the hooks have not
  seen: the hooks are re-attached to the new structure (Opacus validates it again) and the DP
  optimizer is checked to hold none of the replaced parameters, so clipping and noise cover the
  pruned model.
* Under DDP, Lightning's own DDP gradient all-reduce is switched off for every training step
  (``require_backward_grad_sync = False``): the ``DistributedDPOptimizer`` clips locally, adds noise
  on rank 0 only and all-reduces the noisy sum once. Lightning's all-reduce of the raw, unclipped
  gradients would be thrown away anyway; skipping it avoids a second all-reduce per step.

Example:
    >>> dp = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5, name="privacy_main")
    >>> dp.report_name, sorted(dp.logged_keys)
    ('privacy_main', ['privacy/delta', 'privacy/epsilon', 'privacy/noise_multiplier'])
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_trust.core import (
    Capability,
    TrustCallback,
    artifact_dir,
    new_figure,
    save_figure,
    warn_once,
    write_json,
)
from lightning_trust.privacy import loader as private_loader
from lightning_trust.privacy.accounting import (
    ACCOUNTANTS,
    epsilon_of,
    noise_for_epsilon,
    planned_steps,
    sample_rate_for,
    steps_of,
    steps_within_budget,
)
from lightning_trust.privacy.hooks import GRAD_SAMPLE_MODES, PerSampleGradients, check_module
from lightning_trust.privacy.optimizer import CLIPPINGS, default_clip, unwrap_optimizers, wrap_optimizer
from lightning_trust.privacy.samplers import VirtualBatchSampler

__all__ = ["DifferentialPrivacy"]

SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")


class DifferentialPrivacy(TrustCallback):
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
        name: the report section (default ``"privacy"``), for standards such as ``privacy.epsilon``.

    Policy (override in a subclass):

    * :meth:`noise_plan` ``(sample_rate, steps) -> float``: the noise multiplier for the planned run
      (``steps`` noisy steps at ``sample_rate``; ``None`` when the Trainer sets no length). Called
      once, when the first train loader is built; a resumed run keeps the checkpoint's noise.
      Default: ``noise_multiplier``, or Opacus's ``get_noise_multiplier`` for ``target_epsilon``.
    * :meth:`clip_plan` ``(params) -> float | list[float]``: the clipping bound(s) for the DP
      optimizer's parameters (in optimizer order): one number for ``clipping="flat"``, one per
      parameter for ``"per_layer"``. Default: from ``max_grad_norm``.

    The accountant counts whatever noise the plan returns, so ε stays exact; a ``stop_at_epsilon``
    budget still stops the run before it is exceeded.

    Resuming: the accountant history, noise multiplier, sample rate, δ and the ε curve are saved in
    the checkpoint, so a resumed run continues the same ε curve. A DP checkpoint loaded without this
    callback makes Lightning warn that the ``DifferentialPrivacy`` state is unused; training on from it
    without the callback is not private, and a later private run would not count the earlier steps.

    Example:
        >>> class Margin(DifferentialPrivacy):
        ...     def noise_plan(self, sample_rate: float, steps: Optional[int]) -> float:
        ...         return 1.1 * super().noise_plan(sample_rate, steps)  # 10% more noise than the target needs
        >>> class TightFirstLayer(DifferentialPrivacy):
        ...     def clip_plan(self, params: Sequence[nn.Parameter]) -> Union[float, list[float]]:
        ...         return [0.1] + [1.0] * (len(params) - 1)  # one bound per parameter
        >>> dp = Margin(target_epsilon=3.0, target_delta=1e-5, accountant="rdp")
        >>> base = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5, accountant="rdp")
        >>> dp.noise_plan(0.1, 30) == 1.1 * base.noise_plan(0.1, 30)
        True
        >>> TightFirstLayer(noise_multiplier=1.0, clipping="per_layer").clip_plan(list(nn.Linear(3, 2).parameters()))
        [0.1, 1.0]
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5)])
        >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
        >>> trainer.callbacks[0].epsilon_spent  # doctest: +SKIP
        2.98
    """

    report_section = "privacy"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.PER_SAMPLE_GRADIENTS, Capability.REPLACES_TRAIN_LOADER, Capability.NEEDS_INDEPENDENT_LOSSES}
    )
    # DP refuses no other pack callback itself: the callbacks that cannot train beside per-sample
    # gradients or a replaced train loader declare so; a second loader replacer is refused by the seam.
    refuses: ClassVar[Mapping[Capability, str]] = {}
    logged_keys: ClassVar[dict[str, str]] = {
        "privacy/epsilon": "ε spent so far at δ (Opacus's accountant), every log_every_n_steps noisy steps",
        "privacy/delta": "δ of the guarantee",
        "privacy/noise_multiplier": "noise multiplier σ of the noisy steps",
    }
    report_keys: ClassVar[dict[str, str]] = {
        "mechanism": "the DP mechanism: the subsampled Gaussian mechanism of DP-SGD",
        "accountant": "Opacus accountant that computed ε: prv, rdp or gdp",
        "epsilon": "ε spent at δ over every noisy step (resumed runs included)",
        "delta": "δ of the guarantee",
        "noise_multiplier": "noise multiplier σ (noise std = σ · max_grad_norm)",
        "max_grad_norm": "per-sample clipping bound C (per-layer bounds: their Euclidean total)",
        "steps": "noisy optimizer steps accounted",
        "sample_rate": "Poisson sample rate q of a logical batch",
        "sampling": "poisson, or shuffle when Poisson sampling was switched off",
        "target_epsilon": "the ε the noise was planned for (null with a fixed noise multiplier)",
        "stop_at_epsilon": "the budget training stops before exceeding (null: none)",
        "stopped_at_budget": "whether training stopped at the budget",
        "clipping": "flat or per_layer clipping",
        "grad_sample_mode": "how per-sample gradients were computed: hooks, functorch or ghost",
        "expected_batch_size": "expected logical batch size per rank",
        "dataset_size": "training set size N",
        "world_size": "number of DDP ranks",
        "planned_steps": "noisy steps planned for the run (null: unbounded)",
        "secure_rng": "whether noise and sampling used a cryptographically secure generator",
        "guarantee": "the guarantee in words, with its assumptions",
        "epsilon_curve": "[noisy steps, ε] at every logged step",
    }

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
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError(
                "DifferentialPrivacy needs exactly one of `target_epsilon` (the noise is computed from it) or "
                f"`noise_multiplier` (fixed noise); got target_epsilon={target_epsilon}, "
                f"noise_multiplier={noise_multiplier}."
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
        self.fixed_noise_multiplier = noise_multiplier
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
        self.clip_norms: Optional[Union[float, list[float]]] = None
        self.world_size = 1
        self.stopped_at_budget = False
        self.checkpoint_path: Optional[str] = None
        self.figures: dict[str, str] = {}

        self._accountant: Any = create_accountant(accountant)
        self._curve: list[tuple[int, float]] = []
        self._restored: Optional[dict[str, Any]] = None
        self._noise_planned = False
        norm = self.max_grad_norm if isinstance(self.max_grad_norm, float) else 1.0
        self._grads = PerSampleGradients(grad_sample_mode, max_grad_norm=norm, optimizer_params=self._dp_params)
        self._fitting = False
        self._optimizer: Optional[DPOptimizer] = None
        self._max_total_steps: Optional[int] = None
        self._accumulate = 1
        self._physical_parts = 1
        self._remaining: Optional[int] = None
        self._epsilon_cache: tuple[int, float] = (0, 0.0)
        self._last_seen_steps = 0
        self._loader_ids: set[int] = set()

    # ------------------------------------------------------------------ public read-outs
    @property
    def steps(self) -> int:
        """Noisy optimizer steps accounted so far (resumed runs included)."""
        return steps_of(self._accountant.history)

    @property
    def epsilon_spent(self) -> float:
        """ε spent so far at :attr:`delta` (0 before the first step, ``inf`` with no noise)."""
        steps = self.steps
        if self._epsilon_cache[0] != steps:
            self._epsilon_cache = (steps, epsilon_of(self._accountant.history, self.delta, self.accountant))
        return self._epsilon_cache[1]

    def report(self) -> dict[str, Any]:
        """Plain-JSON summary for the standards report (keys: :attr:`report_keys`)."""
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
            "max_grad_norm": self._total_clip(),
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

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run extra forward/backward passes that leave no trace in DP state.

        Inside, Opacus's hooks record nothing, and the per-sample gradient state (``grad_sample``,
        ``_current_grad_sample``, ``_norm_sample``, ``summed_grad``, activations) is restored on exit;
        the accountant only moves on optimizer steps, so it is untouched too. Re-entrant.
        Use it through :func:`lightning_trust.core.isolated_eval`.
        """
        with self._grads.paused():
            yield

    # ------------------------------------------------------------------ policy
    def noise_plan(self, sample_rate: float, steps: Optional[int]) -> float:
        """The noise multiplier for a run of ``steps`` noisy steps at ``sample_rate`` (``steps`` is
        ``None`` when the Trainer sets no length). Override to choose the noise another way; the
        accountant counts what this returns.

        Default: the fixed ``noise_multiplier``, else the smallest noise that keeps ε within
        ``target_epsilon`` at δ after ``steps`` steps (Opacus's ``get_noise_multiplier``).
        """
        if self.target_epsilon is None:
            return float(self.fixed_noise_multiplier or 0.0)
        return noise_for_epsilon(
            self.target_epsilon,
            self.delta if self.delta is not None else float(self.target_delta or 0.0),
            sample_rate,
            steps,
            accountant=self.accountant,
            epsilon_tolerance=self.epsilon_tolerance,
        )

    def clip_plan(self, params: Sequence[nn.Parameter]) -> Union[float, list[float]]:
        """The per-sample clipping bound(s) for the DP optimizer's ``params`` (optimizer order): one
        number for ``clipping="flat"``, one per parameter for ``"per_layer"``. Override to bound
        layers differently; noise scales with the bound(s).

        Default: ``max_grad_norm``; per-layer with one number ``C``: ``C / sqrt(#params)`` each.
        """
        return default_clip(self.max_grad_norm, self.clipping, params)

    # ------------------------------------------------------------------ Lightning hooks
    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """DP acts on fitting only (validation, test and predict run the plain module)."""
        return trainer.state.fn != TrainerFn.FITTING

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._should_skip(trainer):
            return
        self._check_trainer(trainer)
        check_module(pl_module, self.fix_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is None and trainer.ckpt_path:
            warn_once(
                self,
                "resume_without_state",
                f"Resuming from {trainer.ckpt_path}, which holds no DifferentialPrivacy state: the ε reported counts "
                "only the steps from now on, not any training that produced this checkpoint.",
            )
        self._fitting = True
        self._grads.attach(pl_module)
        private_loader.install(
            trainer, self, lambda loader: self._private_loader(trainer, loader), lambda dl: id(dl) in self._loader_ids
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._optimizer is None:
            if trainer.limit_train_batches == 0:
                return
            raise RuntimeError("DifferentialPrivacy did not see the train dataloader; cannot train privately.")
        if self._budget_spent():
            warn_once(
                self,
                "budget_spent",
                f"The privacy budget ε={self.stop_at_epsilon} is already spent ({self.steps} steps); stopping.",
            )
            self.stopped_at_budget = True
            trainer.should_stop = True

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._budget_spent():
            raise RuntimeError(
                f"Another noisy step would exceed stop_at_epsilon={self.stop_at_epsilon}, but the Trainer keeps training "
                "(min_epochs / min_steps?). Refusing to exceed the privacy budget; lower min_epochs/min_steps."
            )
        self._grads.begin_batch()
        if self._grads.structure_changed(pl_module):
            self._follow_structure(pl_module)
        self._set_ddp_sync(trainer, False)  # see the module docstring: one (noisy) all-reduce only

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._accumulate > 1 and self._optimizer is not None:
            self._undo_loss_scaling()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        steps = self.steps
        if steps == self._last_seen_steps:
            return
        self._last_seen_steps = steps
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 1
        if steps % every == 0:
            self._log(pl_module, steps)
        if self._budget_spent() and not self.stopped_at_budget:
            self._stop_at_budget(trainer, pl_module, steps)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_outputs(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._fitting:
            self._restore(trainer)  # leave the user's module and Trainer as they were

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._should_skip(trainer):
            self._restore(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
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

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mechanism = state_dict["accountant"].get("mechanism")
        if mechanism != self.accountant:
            raise ValueError(
                f"The checkpoint's privacy accounting used the {mechanism!r} accountant, this callback "
                f"{self.accountant!r}; set `accountant={mechanism!r}` to continue the same budget."
            )
        self._restored = dict(state_dict)
        self._accountant.load_state_dict(state_dict["accountant"])
        self._accountant.history = [tuple(entry) for entry in self._accountant.history]
        self._curve = [(int(s), float(e)) for s, e in state_dict.get("curve", [])]
        if self.target_epsilon is not None or self.noise_multiplier is None:
            self.noise_multiplier = state_dict["noise_multiplier"]  # the noise planned for this run's target
            self._noise_planned = True
        elif self.noise_multiplier != state_dict["noise_multiplier"]:
            warn_once(
                self,
                "noise_changed",
                f"Resuming with noise_multiplier={self.noise_multiplier}; the checkpoint's steps used "
                f"{state_dict['noise_multiplier']}. The accountant composes both.",
            )
        self.delta = state_dict["delta"]
        self._last_seen_steps = self.steps

    # ------------------------------------------------------------------ setup and teardown
    def _check_trainer(self, trainer: pl.Trainer) -> None:
        """Refuse Trainer settings that break DP-SGD; read ``accumulate_grad_batches``."""
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
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips the summed gradient, which DP-SGD "
                "replaces by per-sample clipping; remove it and set `DifferentialPrivacy(max_grad_norm=...)` instead."
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

    def _restore(self, trainer: pl.Trainer) -> None:
        """Hooks off, the user's loader and optimizer back, Lightning's DDP all-reduce on again."""
        self._grads.detach()
        private_loader.uninstall(trainer, self)
        if self._optimizer is not None:
            trainer.strategy.optimizers = unwrap_optimizers(trainer.strategy.optimizers)
            self._optimizer = None
        self._set_ddp_sync(trainer, True)
        self._fitting = False

    @staticmethod
    def _set_ddp_sync(trainer: pl.Trainer, sync: bool) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = sync

    # ------------------------------------------------------------------ training steps
    def _dp_params(self) -> list[nn.Parameter]:
        return list(self._optimizer.params) if self._optimizer is not None else []

    def _budget_spent(self) -> bool:
        return self._max_total_steps is not None and self.steps >= self._max_total_steps

    def _follow_structure(self, pl_module: pl.LightningModule) -> None:
        """The module's parameters were replaced (structural pruning): hook the new structure and
        check the DP optimizer holds the new parameters."""
        self._grads.reattach(pl_module)
        if self._optimizer is None:
            return
        current = {id(p) for p in pl_module.parameters()}
        stale = [p for p in self._optimizer.params if id(p) not in current]
        if stale:
            raise RuntimeError(
                f"The module's parameters were replaced during training, but the DP optimizer still holds {len(stale)} "
                "of the old ones: their clipped, noised gradients would not reach the model. A callback that changes "
                "the model's structure must point the optimizer's param_groups at the new parameters (as "
                "ProgressivePruning does)."
            )
        rank_zero_info(
            "DifferentialPrivacy: the module's parameters changed (structural pruning); re-attached Opacus's hooks."
        )

    def _undo_loss_scaling(self) -> None:
        """Lightning divided the loss by ``accumulate_grad_batches``; clip the true per-sample gradients."""
        assert self._optimizer is not None
        for p in self._optimizer.params:
            samples = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]
            for g in samples:
                if g is not None:
                    g.mul_(self._accumulate)

    def _on_noisy_step(self, optimizer: DPOptimizer) -> None:
        self._accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)

    # ------------------------------------------------------------------ the private loader and plan
    def _private_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        """Build the Poisson-sampled loader for ``loader`` and, the first time, the DP optimizer."""
        _, size, batch_size = private_loader.training_set(
            loader, self.dataset_size, self.poisson_sampling, delta_known=self.delta is not None
        )
        world = int(trainer.world_size)
        sample_rate = sample_rate_for(size, batch_size, world, self._accumulate)
        if self.sample_rate is None:
            self._resolve(size, sample_rate, world)
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
        dp_loader = private_loader.poisson_loader(
            loader,
            sample_rate,
            private_loader.sampling_generator(trainer.global_rank, self.secure_rng),
            world_size=world,
            max_physical_batch_size=self.max_physical_batch_size,
            optimizer=self._optimizer,
            physical_parts=self._physical_parts,
            accumulate=self._accumulate,
            dataset_size=size,
        )
        self._loader_ids.add(id(dp_loader))
        return dp_loader

    def _resolve(self, size: int, sample_rate: float, world: int) -> None:
        """Fix N, q, δ and the expected batch size (first loader this callback sees)."""
        self.num_samples, self.sample_rate, self.world_size = size, sample_rate, world
        restored = self._restored or {}
        if restored and restored.get("sample_rate") not in (None, sample_rate):
            warn_once(
                self,
                "sample_rate_changed",
                f"The sample rate changed from {restored['sample_rate']} (checkpoint) to {sample_rate}; the "
                "accountant composes both.",
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

    def _plan(self, trainer: pl.Trainer) -> None:
        """Planned steps of this fit and, the first time, the noise multiplier (:meth:`noise_plan`)."""
        assert self.sample_rate is not None
        remaining = planned_steps(
            self.sample_rate,
            max_steps=trainer.max_steps,
            max_epochs=trainer.max_epochs,
            global_step=trainer.global_step,  # restored on resume; counts physical batches with virtual batching
            current_epoch=trainer.current_epoch,
            physical_parts=self._physical_parts,
        )
        self._remaining = remaining
        self.planned_steps = None if remaining is None else self.steps + remaining
        if not self._noise_planned:
            noise = float(self.noise_plan(self.sample_rate, remaining))
            if not (math.isfinite(noise) and noise >= 0):
                raise ValueError(f"`noise_plan` must return a finite noise multiplier >= 0, got {noise}.")
            self.noise_multiplier, self._noise_planned = noise, True
        if self.noise_multiplier == 0:
            warn_once(
                self, "no_noise", "DifferentialPrivacy(noise_multiplier=0): no noise, ε is infinite (debugging only)."
            )
        rank_zero_info(
            f"DifferentialPrivacy: N={self.num_samples}, sample rate {self.sample_rate:.4g}, noise multiplier "
            f"{self.noise_multiplier:.4g}, max_grad_norm {self.max_grad_norm}, {self.accountant} accountant, "
            f"planned steps {self.planned_steps}."
        )

    def _wrap_optimizer(self, trainer: pl.Trainer) -> None:
        optimizers = unwrap_optimizers(trainer.strategy.optimizers)
        if len(optimizers) != 1:
            raise ValueError(
                f"DifferentialPrivacy wraps one optimizer; configure_optimizers returned {len(optimizers)}. Use one "
                "optimizer with several param groups."
            )
        optimizer = optimizers[0]
        assert self.noise_multiplier is not None and self.expected_batch_size is not None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.clip_norms = self.clip_plan(params)
        self._optimizer = wrap_optimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.clip_norms,
            expected_batch_size=self.expected_batch_size / self._accumulate,
            clipping=self.clipping,
            distributed=self.world_size > 1,
            grad_sample_mode=self.grad_sample_mode,
            secure_rng=self.secure_rng,
            step_hook=self._on_noisy_step,
        )
        if isinstance(self.clip_norms, (int, float)):
            self._grads.set_max_grad_norm(float(self.clip_norms))
        trainer.strategy.optimizers = [self._optimizer]

    def _budget_steps(self) -> Optional[int]:
        """Total noisy steps allowed by ``stop_at_epsilon`` (``None``: no limit within the plan)."""
        assert self.noise_multiplier is not None and self.sample_rate is not None
        return steps_within_budget(
            self._accountant.history,
            self.noise_multiplier,
            self.sample_rate,
            self.delta,
            self.accountant,
            self.stop_at_epsilon,
            self._remaining,
        )

    def _total_clip(self) -> float:
        """The clipping bound of the whole gradient: the flat bound, or the Euclidean total of per-layer bounds."""
        norms = self.clip_norms
        if norms is None or type(self).clip_plan is DifferentialPrivacy.clip_plan:
            norms = self.max_grad_norm  # the user's own number, not its rounded per-layer split
        if isinstance(norms, (int, float)):
            return float(norms)
        return float(math.sqrt(sum(c * c for c in norms)))

    # ------------------------------------------------------------------ logging and outputs
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

    def _write_outputs(self, trainer: pl.Trainer) -> None:
        """The last point of the ε curve, its figure, and ``privacy.json``."""
        steps = self.steps
        if steps and (not self._curve or self._curve[-1][0] != steps):
            self._curve.append((steps, self.epsilon_spent))
        folder = artifact_dir(trainer, "privacy")
        if self._curve and trainer.is_global_zero:
            path = folder / "epsilon_curve.png"
            save_figure(trainer, self._figure(), path, tag="privacy/epsilon_curve")
            self.figures["epsilon_curve"] = str(path)
        write_json(folder / "privacy.json", self.report())

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
