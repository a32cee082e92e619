"""The :class:`PrivacyAudit` callback: the one-run privacy audit of Steinke, Nasr and Jagielski
("Privacy Auditing with One (1) Training Run", NeurIPS 2023) inside the same fit as the real data.

Canaries (:mod:`~lightning_trust.privacy.audit_canaries` for input-space ones,
:mod:`~lightning_trust.privacy.audit_gradients` for white-box gradient ones) are each included with
probability 1/2 by a seeded coin; after fit each is scored, the highest and lowest scores are
guessed in and out, and the guesses give an empirical ε lower bound
(:mod:`~lightning_trust.privacy.audit_bound`), reported beside the accountant's ε.

Example:
    >>> audit = PrivacyAudit(num_canaries=500, seed=1)
    >>> audit.report_name, audit.canaries, sorted(audit.logged_keys)
    ('privacy_audit', 'input', ['privacy_audit/epsilon_lower_bound'])
    >>> trainer = pl.Trainer(max_epochs=3, callbacks=[DifferentialPrivacy(target_epsilon=4.0), audit])
    >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
    >>> audit.epsilon_lower_bound <= trainer.callbacks[0].epsilon_spent  # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from lightning_trust.core import (
    BatchContract,
    Capability,
    TrustCallback,
    artifact_dir,
    find_callback,
    isolated_eval,
    log_metrics,
    save_figure,
    warn_once,
    write_json,
)
from lightning_trust.core.seam import restore_train_loader, state_key_of, swap_train_loader
from lightning_trust.privacy.audit_bound import AuditResult, audit
from lightning_trust.privacy.audit_canaries import (
    InputCanaries,
    canary_loader,
    check_train_loader,
    loss_or_margin,
    score_canaries,
)
from lightning_trust.privacy.audit_checks import check_arguments, check_with_dp
from lightning_trust.privacy.audit_gradients import GradientCanaries
from lightning_trust.privacy.audit_outputs import LOGGED_KEYS, REPORT_KEYS, audit_report, scores_figure
from lightning_trust.privacy.callback import DifferentialPrivacy

__all__ = ["PrivacyAudit"]

_STATE_VERSION = 1


class PrivacyAudit(TrustCallback):
    r"""Audit a run's privacy empirically, in the same run: an ε lower bound from canaries.

    ``num_canaries`` canaries are each included in training with probability 1/2 (a seeded coin).
    After fit each canary gets a score, the ``k+`` highest are guessed "in", the ``k-`` lowest "out",
    and the largest ε that the number of right guesses rules out at ``confidence`` is reported as
    ``privacy_audit.epsilon_lower_bound``, beside the ``DifferentialPrivacy`` accountant's ε. A bound
    above the accountant's ε would show the claim false (a bug in clipping, noise or sampling); a
    bound far below it says this audit could not tell, not that the model is more private.

    Args:
        num_canaries: m. Input canaries take at most half the training set.
        canaries: ``"input"``: m training samples, held out and relabeled (``canary_labels``), each
            put back by the coin; they go through the train loader (DP's Poisson loader, Lightning's
            distributed sampler) like any sample. ``"gradient"`` (white-box, needs
            ``DifferentialPrivacy``): m fixed directions added as clipped per-sample gradients to the
            DP optimizer's clipped sum before noise, each included canary joining a step with the
            run's sample rate.
        gradient_canary: ``"dirac"`` (one parameter coordinate per canary, the paper's choice) or
            ``"gaussian"`` (a dense random unit direction).
        canary_labels: input canaries' labels: ``"random"`` (a class other than the sample's own,
            easy to memorise) or ``"true"`` (the samples as they are).
        score: input canaries' score: ``"loss"`` (minus the cross-entropy of the canary's label)
            or ``"margin"`` (its logit minus the best other). Gradient canaries score
            ``-<θ_T - θ_0, u>``.
        k_plus, k_minus: fixed numbers of canaries guessed in / out (either; the other defaults to
            0). Default: search ``k+ = k- = m/2, m/4, ...`` and report the best bound, each candidate
            tested at ``(1 - confidence) / candidates`` (a union bound keeps the confidence).
        confidence: confidence of the lower bound.
        delta: δ of the hypothesis tested. Default: the ``DifferentialPrivacy`` δ, else 0.
        num_classes: classes for random labels. Default: the datamodule's ``num_classes``, else the
            largest label among the canary sources plus one.
        batch_keys: how to read batches (see :class:`~lightning_trust.core.BatchContract`).
        score_batch_size: canaries per scoring batch (default: the train loader's batch size).
        seed: seed of the coin, the canaries and the gradient canaries' per-step draws.
        name: the report section (default ``"privacy_audit"``).

    Canaries are training samples only: validation, test, fairness numbers and the card's data
    facts never see them (the training metrics the module logs do). What they cost: the report's
    ``canary_fraction`` and ``held_out_samples``; the accuracy cost needs a run without the audit
    (``benchmarks/audit.py`` measures it).

    Policy (override in a subclass): :meth:`canary_score` ``(logits, labels) -> scores``.

    Example:
        >>> class Confidence(PrivacyAudit):
        ...     def canary_score(self, logits: Tensor, labels: Tensor) -> Tensor:
        ...         return logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)  # the label's probability
        >>> Confidence(num_canaries=4).canary_score(torch.zeros(2, 2), torch.tensor([0, 1])).tolist()
        [0.5, 0.5]
    """

    report_section = "privacy_audit"
    logged_keys: ClassVar[dict[str, str]] = LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = REPORT_KEYS

    def __init__(
        self,
        num_canaries: int = 1000,
        canaries: Literal["input", "gradient"] = "input",
        gradient_canary: Literal["dirac", "gaussian"] = "dirac",
        canary_labels: Literal["random", "true"] = "random",
        score: Literal["loss", "margin"] = "loss",
        k_plus: Optional[int] = None,
        k_minus: Optional[int] = None,
        confidence: float = 0.95,
        delta: Optional[float] = None,
        num_classes: Optional[int] = None,
        batch_keys: Optional[dict[str, Any]] = None,
        score_batch_size: Optional[int] = None,
        seed: int = 0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        check_arguments(
            num_canaries, canaries, gradient_canary, canary_labels, score, k_plus, k_minus, confidence, delta
        )
        for label, value in (("num_classes", num_classes), ("score_batch_size", score_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{label}` must be a positive integer or None, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
        self.num_canaries, self.canaries, self.gradient_canary = num_canaries, canaries, gradient_canary
        self.canary_labels, self.score, self.confidence, self.delta = canary_labels, score, confidence, delta
        self.k_plus, self.k_minus, self.num_classes = k_plus, k_minus, num_classes
        self.batch_keys, self.score_batch_size, self.seed = batch_keys, score_batch_size, seed

        self._inputs = InputCanaries(num_canaries, seed, canary_labels)
        self._gradients = GradientCanaries(num_canaries, seed, gradient_canary)
        #: per-canary scores after fit (higher: guessed in), and the audit's outcome
        self.scores: Optional[np.ndarray] = None
        self.result: Optional[AuditResult] = None
        self.accountant_epsilon: Optional[float] = None
        self.accountant_delta: Optional[float] = None
        self.training_samples: Optional[int] = None
        self.score_seconds: Optional[float] = None
        self.figures: dict[str, str] = {}
        self._dp: Optional[DifferentialPrivacy] = None
        self._contract = BatchContract()
        self._source: Any = None  # the user's training dataset the input canaries come from
        self._collate: Any = None
        self._batch_size = 64
        self._classes: Optional[int] = num_classes
        self._rank = 0
        self._restored = False
        self._swapped = False
        self._folder: Optional[Path] = None
        self._trainer: Any = None

    # ------------------------------------------------------------------ declarations
    @property
    def capabilities(self) -> frozenset[Capability]:  # type: ignore[override]  # depends on the canary type
        if self.canaries == "gradient":
            return frozenset({Capability.EDITS_GRADIENTS, Capability.EXTRA_PASSES})
        return frozenset({Capability.REPLACES_TRAIN_LOADER, Capability.EXTRA_PASSES})

    @property
    def refuses(self) -> Mapping[Capability, str]:  # type: ignore[override]  # depends on the canary type
        why: dict[Capability, str] = {
            Capability.FEDERATED_ROUNDS: "the one-run audit assumes one training set sampled by one loader; audit "
            "the federated run's client-level DP separately"
        }
        if self.canaries == "gradient":
            why[Capability.CHANGES_PARAMETERS] = (
                "gradient canaries lie on fixed parameter coordinates, which a changing structure would move; "
                "use canaries='input'"
            )
        return why

    @property
    def state_key(self) -> str:
        return state_key_of(self, name=self.report_name)

    # ------------------------------------------------------------------ read-outs
    @property
    def included(self) -> np.ndarray:
        """The coin: which canaries were put in training."""
        return self._gradients.coin if self.canaries == "gradient" else self._inputs.coin

    @property
    def canary_steps(self) -> Optional[int]:
        """Times included gradient canaries joined a noisy step (on rank 0; ``None`` for input canaries)."""
        return int(self._gradients.added.sum()) if self.canaries == "gradient" else None

    @property
    def epsilon_lower_bound(self) -> Optional[float]:
        """The empirical ε lower bound (``None`` before fit ends)."""
        return None if self.result is None else self.result.epsilon_lower_bound

    def report(self) -> dict[str, Any]:
        """Plain-JSON summary for the standards report (keys: :attr:`report_keys`, and ``figures``)."""
        self._draw_figure()
        return audit_report(self)

    # ------------------------------------------------------------------ policy
    def canary_score(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-canary score of input canaries from the trained model's ``logits`` and the canaries'
        ``labels`` (higher: more likely trained on). Default: ``-loss`` or the margin (``score``)."""
        return loss_or_margin(logits, labels, self.score)

    # ------------------------------------------------------------------ Lightning hooks
    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """The audit acts on fitting only."""
        return trainer.state.fn != TrainerFn.FITTING

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._should_skip(trainer):
            return
        self._folder = artifact_dir(trainer, "privacy_audit")  # a collective under DDP: every rank, here
        self._rank = int(trainer.global_rank)
        self._dp = find_callback(trainer, DifferentialPrivacy)
        self._contract = BatchContract.resolve(self.batch_keys, trainer)
        if self.num_classes is None and self.canary_labels == "random":
            classes = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
            self._classes = classes if isinstance(classes, int) else None
        else:
            self._classes = self.num_classes
        check_with_dp(self.canaries, self._dp)
        if self._dp is not None:
            if self.canaries == "input":
                self._dp.extend_training(self, train_loader=self._with_canaries)
            else:
                self._dp.extend_training(self, before_noise=self._add_gradient_canaries)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path and not self._restored:
            if self.canaries == "input":
                raise ValueError(
                    f"Resuming from {trainer.ckpt_path}, which holds no PrivacyAudit state: the model trained on the "
                    "canaries' source samples before, so the canaries left out are not unseen and the bound would be "
                    "invalid. Start the audited run from scratch, or audit with canaries='gradient'."
                )
            warn_once(
                self,
                "resume_without_state",
                f"Resuming from {trainer.ckpt_path}, which holds no PrivacyAudit state: the gradient canaries join "
                "the training from now on.",
            )
        if self.canaries == "input" and self._dp is None:
            swap_train_loader(trainer, self, self._with_canaries)
            self._swapped = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.canaries == "input":
            if not self._inputs.drawn and trainer.limit_train_batches != 0:
                raise RuntimeError("PrivacyAudit did not see the train dataloader; no canaries were trained.")
            return
        self._gradients.bind(pl_module)
        self._gradients.start(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measure(trainer, pl_module)
        if self.result is not None:
            log_metrics(
                trainer, pl_module, {"privacy_audit/epsilon_lower_bound": self.result.epsilon_lower_bound}, False
            )
        if self._folder is not None:
            write_json(self._folder / "privacy_audit.json", self.report())

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._should_skip(trainer):
            self._restore(trainer)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": _STATE_VERSION, "canaries": self.canaries, "seed": self.seed}
        if self.canaries == "input":
            state["input"] = self._inputs.state_dict()
        else:
            state["gradient"] = self._gradients.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("canaries") != self.canaries:
            raise ValueError(
                f"The checkpoint's PrivacyAudit used canaries={state_dict.get('canaries')!r}, this one "
                f"canaries={self.canaries!r}; resume with the same audit."
            )
        if self.canaries == "input":
            self._inputs.load_state_dict(state_dict["input"])
        else:
            self._gradients.load_state_dict(state_dict["gradient"])
        self.num_canaries, self.seed = len(self.included), int(state_dict["seed"])  # the run's draw, not this seed
        self._restored = True

    # ------------------------------------------------------------------ the audit
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score every canary with the trained model and compute the bound (every rank; scores gathered)."""
        started = time.perf_counter()
        if self.canaries == "input":
            if not self._inputs.drawn:
                return
            samples = self._inputs.samples(self._source)
            device = pl_module.device
            with isolated_eval(pl_module, trainer):
                scores, mine = score_canaries(
                    pl_module,
                    samples,
                    self._collate,
                    self._contract,
                    self.canary_score,
                    self.score_batch_size or self._batch_size,
                    device,
                    rank=int(trainer.global_rank),
                    world=int(trainer.world_size),
                )
            scores = trainer.strategy.reduce(scores, reduce_op="sum")
            mine = trainer.strategy.reduce(mine, reduce_op="sum")
            if not torch.all(mine == 1):
                raise RuntimeError("Canary scores were not gathered from every rank exactly once.")
            self.scores = scores.cpu().numpy()
        else:
            if self._gradients.initial is None:
                return
            self.scores = self._gradients.scores(pl_module)
            self.training_samples = self._dp.num_samples if self._dp is not None else None
        self.score_seconds = time.perf_counter() - started
        dp = self._dp
        self.accountant_epsilon = float(dp.epsilon_spent) if dp is not None else None
        self.accountant_delta = dp.delta if dp is not None else None
        delta = self.delta if self.delta is not None else float(self.accountant_delta or 0.0)
        self.result = audit(self.scores, self.included, delta, self.confidence, self.k_plus, self.k_minus)
        self.figures = {}
        self._trainer = weakref.ref(trainer)

    def _with_canaries(self, loader: Any) -> Any:
        """The train loader over the real samples minus the canary sources, plus the included canaries."""
        check_train_loader(loader)
        self._source, self._collate = loader.dataset, loader.collate_fn
        self._batch_size = int(loader.batch_size)
        self._inputs.draw(loader.dataset, self._contract, self._classes)
        dataset = self._inputs.training_set(loader.dataset)
        self.training_samples = len(dataset)
        return canary_loader(loader, dataset)

    def _add_gradient_canaries(self, optimizer: Any) -> None:
        """``before_noise`` of DP: rank 0 adds the step's canaries, as it adds the noise."""
        dp = self._dp
        if dp is None or dp.sample_rate is None or self._rank != 0:
            return
        self._gradients.add(optimizer, step=dp.steps, sample_rate=dp.sample_rate)

    def _restore(self, trainer: pl.Trainer) -> None:
        if self._swapped:
            restore_train_loader(trainer, self)
            self._swapped = False
        if self._dp is not None:
            self._dp.extend_training(self)

    def _draw_figure(self) -> None:
        trainer = self._trainer() if callable(self._trainer) else None
        if self.scores is None or self.result is None or self._folder is None or "scores" in self.figures:
            return
        if trainer is not None and not trainer.is_global_zero:
            return
        path = self._folder / "canary_scores.png"
        score = "update_projection" if self.canaries == "gradient" else self.score
        figure = scores_figure(
            self.scores, self.included, self.result.k_plus, self.result.k_minus, score, self.result.epsilon_lower_bound
        )
        save_figure(trainer, figure, path, tag="privacy_audit/canary_scores")
        self.figures["scores"] = str(path)
