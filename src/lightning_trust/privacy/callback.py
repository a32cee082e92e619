"""The :class:`DifferentialPrivacy` callback: DP-SGD (Opacus) for any LightningModule.

Its arguments, public read-outs (ε spent, the report), policy methods and Lightning hooks; how
Opacus is attached to the unchanged module is described in :mod:`lightning_trust.privacy`.

Example:
    >>> dp = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5, name="privacy_main")
    >>> dp.report_name, sorted(dp.logged_keys)
    ('privacy_main', ['privacy/delta', 'privacy/epsilon', 'privacy/noise_multiplier'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from torch import nn
from typing_extensions import override

from lightning_trust.core import Capability, TrustCallback, warn_once
from lightning_trust.privacy import loader as private_loader
from lightning_trust.privacy.accounting import epsilon_of, noise_for_epsilon, sample_rate_for, steps_of
from lightning_trust.privacy.attachment import OpacusAttachment
from lightning_trust.privacy.bookkeeping import choose_mode
from lightning_trust.privacy.checks import check_arguments, check_trainer
from lightning_trust.privacy.empty import EmptyBatchStep
from lightning_trust.privacy.extensions import register
from lightning_trust.privacy.hooks import check_module
from lightning_trust.privacy.optimizer import default_clip
from lightning_trust.privacy.outputs import (
    LOGGED_KEYS,
    REPORT_KEYS,
    log_epsilon,
    privacy_report,
    stop_at_budget,
    write_outputs,
)
from lightning_trust.privacy.plan import (
    budget_steps,
    plan_fit,
    plan_optimizer,
    plan_state,
    resolve_training_set,
    resume_plan,
)
from lightning_trust.privacy.token_loss import TokenLossCheck

__all__ = ["DifferentialPrivacy"]


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
            every layer), ``"ghost"`` (fast gradient clipping: per-sample norms without per-sample
            gradients, then a second backward; the loss must be computed from the module's own output),
            ``"bk"`` (book-keeping: one backward pass, per-sample norms and the clipped sum from the kept
            activations and output gradients; flat clipping, no ``accumulate_grad_batches``) or ``"auto"``
            (``"bk"`` when the model and configuration allow it, else ``"hooks"``; the choice is logged
            and reported as ``grad_sample_mode_used``).
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
        per_sample_loss: declare that the training loss is a mean of per-sample losses. Without it, token-level
            targets (``labels`` of shape ``(batch, tokens)``, where Hugging Face's own loss averages over every
            token of the batch) warn once and the report lists ``per_sample_loss`` under ``unmet_assumptions``
            (:mod:`~lightning_trust.privacy.token_loss`).
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
    logged_keys: ClassVar[dict[str, str]] = LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = REPORT_KEYS

    def __init__(
        self,
        target_epsilon: Optional[float] = None,
        target_delta: Optional[float] = None,
        noise_multiplier: Optional[float] = None,
        max_grad_norm: Union[float, list[float]] = 1.0,
        accountant: Literal["prv", "rdp", "gdp"] = "prv",
        poisson_sampling: bool = True,
        clipping: Literal["flat", "per_layer"] = "flat",
        grad_sample_mode: Literal["hooks", "functorch", "ghost", "bk", "auto"] = "hooks",
        max_physical_batch_size: Optional[int] = None,
        secure_rng: bool = False,
        fix_module: bool = False,
        stop_at_epsilon: Optional[float] = None,
        epsilon_tolerance: float = 0.01,
        dataset_size: Optional[int] = None,
        log_every_n_steps: Optional[int] = None,
        per_sample_loss: bool = False,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        check_arguments(
            target_epsilon,
            target_delta,
            noise_multiplier,
            max_grad_norm,
            accountant,
            poisson_sampling,
            clipping,
            grad_sample_mode,
            max_physical_batch_size,
            secure_rng,
            stop_at_epsilon,
            epsilon_tolerance,
            dataset_size,
            log_every_n_steps,
            fix_module=fix_module,
            per_sample_loss=per_sample_loss,
        )

        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.fixed_noise_multiplier = noise_multiplier
        self.max_grad_norm = list(max_grad_norm) if isinstance(max_grad_norm, (list, tuple)) else float(max_grad_norm)
        self.accountant = accountant
        self.poisson_sampling = poisson_sampling
        self.clipping = clipping
        self.grad_sample_mode = grad_sample_mode
        self.grad_sample_mode_used: Optional[str] = None if grad_sample_mode == "auto" else grad_sample_mode
        self.max_physical_batch_size = max_physical_batch_size
        self.secure_rng = secure_rng
        self.fix_module = fix_module
        self.stop_at_epsilon = stop_at_epsilon if stop_at_epsilon is not None else target_epsilon
        self.epsilon_tolerance = epsilon_tolerance
        self.dataset_size = dataset_size
        self.log_every_n_steps = log_every_n_steps
        self.per_sample_loss = per_sample_loss

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
        self.epsilon_curve: list[tuple[int, float]] = []  # (noisy steps, ε) at every logged step

        self._accountant: Any = create_accountant(accountant)
        self._restored: Optional[dict[str, Any]] = None
        self._noise_planned = False
        norm = self.max_grad_norm if isinstance(self.max_grad_norm, float) else 1.0
        self._opacus = OpacusAttachment(grad_sample_mode, max_grad_norm=norm)
        self._token_loss = TokenLossCheck(per_sample_loss)
        self._empty = EmptyBatchStep()  # an empty Poisson draw: the user's step skipped, the noisy step kept
        self._max_total_steps: Optional[int] = None
        self._loader_transforms: dict[int, Callable[[Any], Any]] = {}  # by owner, see extend_training
        self._epsilon_cache: tuple[int, float] = (0, 0.0)
        self._last_seen_steps = 0

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
        return privacy_report(self)

    def extend_training(
        self,
        owner: object,
        train_loader: Optional[Callable[[Any], Any]] = None,
        before_noise: Optional[Callable[[DPOptimizer], None]] = None,
    ) -> None:
        """Let another callback (:class:`~lightning_trust.privacy.PrivacyAudit`) add to what DP trains on,
        whatever the callback order; call it from ``setup``. Both hooks stay inside the guarantee:

        * ``train_loader(user's loader) -> loader``: runs before the Poisson loader is built, which then
          samples the returned loader's dataset (N and q count its samples);
        * ``before_noise(dp_optimizer)``: runs at every noisy step after the clipped per-sample gradients
          are summed into ``p.summed_grad`` and before noise is added, on every rank (under DDP only
          rank 0's sum is noised); what it adds must itself be a clipped per-sample gradient.

        Called again by the same ``owner`` it replaces that owner's hooks; with neither, removes them.
        """
        register(self._loader_transforms, self._opacus.before_noise, owner, train_loader, before_noise)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run extra forward/backward passes that leave no trace in DP state.

        Inside, Opacus's hooks record nothing, and the per-sample gradient state (``grad_sample``,
        ``_current_grad_sample``, ``_norm_sample``, ``summed_grad``, activations) is restored on exit;
        the accountant only moves on optimizer steps, so it is untouched too. Re-entrant.
        Use it through :func:`lightning_trust.core.isolated_eval`.
        """
        with self._opacus.paused():
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
        self._opacus.accumulate = check_trainer(trainer, self.grad_sample_mode, self.max_physical_batch_size)
        check_module(pl_module, self.fix_module)
        mode, why = choose_mode(self.grad_sample_mode, pl_module, self.clipping, self._opacus.accumulate)
        if self.grad_sample_mode == "auto" and mode != self.grad_sample_mode_used:
            rank_zero_info(f"DifferentialPrivacy: grad_sample_mode='auto' uses {mode!r}: {why}.")
        self.grad_sample_mode_used = mode
        self._opacus.grads.set_mode(mode)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is None and trainer.ckpt_path:
            warn_once(
                self,
                "resume_without_state",
                f"Resuming from {trainer.ckpt_path}, which holds no DifferentialPrivacy state: the ε reported counts "
                "only the steps from now on, not any training that produced this checkpoint.",
            )
        self._opacus.attach(trainer, pl_module, self, lambda loader: self._private_loader(trainer, loader))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._opacus.optimizer is None:
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
        self._token_loss.check(self, batch)
        if self._budget_spent():
            raise RuntimeError(
                f"Another noisy step would exceed stop_at_epsilon={self.stop_at_epsilon}, but the Trainer keeps training "
                "(min_epochs / min_steps?). Refusing to exceed the privacy budget; lower min_epochs/min_steps."
            )
        self._opacus.begin_batch(trainer, pl_module)
        if self.poisson_sampling:
            self._empty.begin(pl_module, batch)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._empty.fill(self._opacus.optimizer)
        self._opacus.before_optimizer_step()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._empty.end()
        steps = self.steps
        if steps == self._last_seen_steps:
            return
        self._last_seen_steps = steps
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", None) or 1
        if steps % every == 0:
            log_epsilon(self, pl_module, steps)
        if self._budget_spent() and not self.stopped_at_budget:
            stop_at_budget(self, trainer, pl_module, steps)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_outputs(self, trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._empty.end()
        if self._opacus.active:
            self._opacus.restore(trainer, self)  # leave the user's module and Trainer as they were

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._should_skip(trainer):
            self._opacus.restore(trainer, self)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return plan_state(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        resume_plan(self, state_dict)

    # ------------------------------------------------------------------ the private loader and its plan
    def _budget_spent(self) -> bool:
        return self._max_total_steps is not None and self.steps >= self._max_total_steps

    def _on_noisy_step(self, optimizer: DPOptimizer) -> None:
        self._accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)

    def _private_loader(self, trainer: pl.Trainer, loader: Any) -> Any:
        """``wrap`` of the seam: the Poisson-sampled loader for ``loader`` and, the first time in a
        fit, the plan and the DP optimizer (:mod:`~lightning_trust.privacy.plan`)."""
        for transform in list(self._loader_transforms.values()):  # extend_training: canaries join the data
            loader = transform(loader)
        _, size, batch_size = private_loader.training_set(
            loader, self.dataset_size, self.poisson_sampling, delta_known=self.delta is not None
        )
        world = int(trainer.world_size)
        sample_rate = sample_rate_for(size, batch_size, world, self._opacus.accumulate)
        if self.sample_rate is None:
            resolve_training_set(self, size, sample_rate, world)
        elif sample_rate != self.sample_rate or size != self.num_samples:
            raise ValueError(
                f"The train loader gives sample rate {sample_rate} over N={size}, the first gave "
                f"{self.sample_rate} over N={self.num_samples}; keep batch size and dataset fixed under DP."
            )
        if self._opacus.optimizer is None:  # first loader of this fit
            remaining = plan_fit(self, trainer)
            plan_optimizer(self, trainer)
            self._max_total_steps = budget_steps(self, remaining)
        if not self.poisson_sampling:
            return loader
        return self._opacus.poisson_loader(
            trainer, loader, sample_rate, self.secure_rng, self.max_physical_batch_size, dataset_size=size
        )
