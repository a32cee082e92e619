"""When the explain callbacks run: each selected validation epoch, at the end of fit, after testing.

Example:
    >>> validate_stages(["validation_end", "fit_end"])
    ('validation_end', 'fit_end')
    >>> class Fit:  # a Trainer in its third epoch of fit
    ...     current_epoch = 2
    >>> should_run(Fit(), every_n_epochs=3), should_run(Fit(), every_n_epochs=2)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability
from lightning_trust.core.output import artifact_dir

__all__ = ["STAGES", "ScheduledPass", "should_run", "validate_stages"]

#: When a callback runs: at the end of each validation epoch, once at the end of fit, or after testing.
STAGES: tuple[str, ...] = ("validation_end", "fit_end", "test_end")


def validate_stages(run_on: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``run_on`` as a tuple of :data:`STAGES`; raises ``ValueError`` for anything else."""
    stages = (run_on,) if isinstance(run_on, str) else tuple(run_on)
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise ValueError(f"`run_on` must be one or more of {list(STAGES)}, got {run_on!r}.")
    return stages


def should_run(trainer: Any, every_n_epochs: int) -> bool:
    """Every ``every_n_epochs``-th epoch during fit; always in a standalone ``trainer.validate``."""
    standalone = getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.VALIDATING
    return standalone or (trainer.current_epoch + 1) % every_n_epochs == 0


class ScheduledPass(TrustCallback):
    """Base of the explain callbacks: runs :meth:`_run` on rank zero at the configured ``stages``
    (each validation epoch that ``every_n_epochs`` selects, fit end, test end), once per trigger.

    Subclasses set ``area`` (their folder under ``<log_dir>/lightning_trust``) and implement
    :meth:`_run`; :meth:`runs_at` is the policy of which stages trigger a pass.
    """

    capabilities = frozenset({Capability.EXTRA_PASSES})
    area: str = ""

    def __init__(self, run_on: Union[str, Sequence[str]], every_n_epochs: int, name: Optional[str] = None) -> None:
        super().__init__(name=name)
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        self.stages = validate_stages(run_on)
        self.every_n_epochs = every_n_epochs
        self._done: set[tuple[str, int, int]] = set()
        self._folder: Optional[Path] = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # On every rank: `trainer.log_dir` broadcasts, so rank zero alone must never ask for it later.
        self._folder = artifact_dir(trainer, self.area)

    def folder(self, trainer: Any) -> Path:
        """This callback's output folder."""
        return self._folder if self._folder is not None else artifact_dir(trainer, self.area)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trigger(trainer, pl_module, "validation_end", hook_allows_log=True)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trigger(trainer, pl_module, "fit_end", hook_allows_log=False)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trigger(trainer, pl_module, "test_end", hook_allows_log=True)

    def runs_at(self, stage: str) -> bool:
        """Whether a pass runs at ``stage`` (one of :data:`STAGES`); by default: the configured ``run_on``."""
        return stage in self.stages

    def _should_skip(self, trainer: Any, stage: str) -> bool:
        """The one skip rule: a stage not run at, the sanity check, an epoch ``every_n_epochs`` does
        not select, a trigger already served (several validation runs in one epoch count once), or
        a process other than rank zero (rank zero works; the others carry on, no collective is made)."""
        if not self.runs_at(stage):
            return True
        if stage == "validation_end" and (trainer.sanity_checking or not should_run(trainer, self.every_n_epochs)):
            return True
        return (stage, trainer.current_epoch, trainer.global_step) in self._done or not trainer.is_global_zero

    def _trigger(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        if self._should_skip(trainer, stage):
            return
        self._done.add((stage, trainer.current_epoch, trainer.global_step))
        self._run(trainer, pl_module, stage, hook_allows_log)

    def _run(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        raise NotImplementedError
