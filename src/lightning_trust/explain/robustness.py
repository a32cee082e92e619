"""``AdversarialRobustness``: Captum's FGSM/PGD attacks on a fixed sample while the model trains.

Any model inputs the batch contract reads: a tensor, a dict of keyword inputs (the float input, e.g.
``pixel_values``, attacked; the rest passed along), token ids (attacked in embedding space, see
:mod:`~lightning_trust.explain.robustness_inputs`). The passes stay within ``max_overhead`` of the
fit's time (:class:`~lightning_trust.core.budget.OverheadBudget`).

Example:
    >>> robust = AdversarialRobustness(attacks=["fgsm", "pgd"], epsilons=[0.0, 0.05, 0.1], num_samples=256)
    >>> [eps_name(e) for e in robust.epsilons]  # how report keys and metric names write them
    ['0', '0.05', '0.1']
    >>> import lightning.pytorch as pl
    >>> from lightning_trust.demo import DigitsDataModule, SmallCNN
    >>> pl.Trainer(max_epochs=5, callbacks=[robust]).fit(SmallCNN(), DigitsDataModule())  # doctest: +SKIP
    >>> robust.report()["robust_accuracy"]["pgd"]["0.1"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sized
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.budget import DEFAULT_MAX_OVERHEAD, OverheadBudget
from lightning_trust.core.loaders import find_loader
from lightning_trust.core.output import DeferredFigures, log_metrics, save_figure, write_json
from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.seam import trained_epoch
from lightning_trust.core.sizing import MIN_SAMPLES, PassSizer, affords_pass, fraction_done
from lightning_trust.core.tensors import map_tensors, to_jsonable
from lightning_trust.evaluation.schedule import last_epoch
from lightning_trust.explain.keys import ROBUSTNESS_LOGGED_KEYS, ROBUSTNESS_REPORT_KEYS
from lightning_trust.explain.plots import robust_accuracy_figure
from lightning_trust.explain.progress import progress
from lightning_trust.explain.robustness_checks import (
    ATTACKS,
    DEFAULT_EPSILONS,
    check_arguments,
    check_sample,
    check_schedule,
)
from lightning_trust.explain.robustness_inputs import AttackSample, attack_space, draw_attack_sample
from lightning_trust.explain.robustness_pass import eps_name, logged_metrics, run_attacks, suite_forwards
from lightning_trust.explain.schedule import ScheduledPass
from lightning_trust.fairness.metrics_args import check_figures

__all__ = ["ATTACKS", "AdversarialRobustness", "eps_name"]


class AdversarialRobustness(ScheduledPass):
    r"""Robust accuracy under Captum's ``FGSM`` and ``PGD`` on a fixed, seeded evaluation sample.

    At each trigger (``run_on``) every attack runs at every ``epsilon`` (input space, clamped to the
    inputs' valid range; embedding space for token ids, padding unperturbed) on ``num_samples``
    validation samples drawn once at setup (seeded, stratified by class) through the batch contract;
    a causal LM's token labels count per token (the logits at ``t`` against the label at ``t + 1``
    when the labels are the input ids). In an isolated pass (DP hooks paused, eval mode, forked RNG,
    parameters frozen, everything restored). Logged: ``robustness/clean_acc``,
    ``robustness/<attack>/acc@<eps>``, ``robustness/<attack>/success@<eps>`` (attack success rate:
    share of the clean-correct samples the attack flips), ``robustness/worst_acc`` and, with
    ``min_perturbation``, ``robustness/min_perturbation`` (median smallest breaking FGSM ε, Captum's
    ``MinParamPerturbation``). Files in ``<log_dir>/lightning_trust/robustness/``:
    ``robustness.json``, figure ``robust_accuracy.png`` (drawn when the report is read, see ``figures``).
    Under DDP only rank zero attacks (its decisions need no other rank).

    Within the budget: the sample is attacked in a fixed order (the classes in turn), chunk by chunk,
    every attack and epsilon on a chunk before the next; a pass during fit times its first chunk and
    attacks only as many samples as ``max_overhead`` still affords (the first pass that is not final
    priced before it runs: the validation pass's time per row times the attacks' forwards per sample)
    (:class:`~lightning_trust.core.sizing.PassSizer`): the final pass at least 64 (a 95% interval of
    about +-0.1), one that is not final keeping a whole final pass's cost (the report's number first). The report says how many
    (``samples`` of ``samples_available``, ``truncated``) with a Wilson interval per number (``intervals``).

    Args:
        attacks: ``"fgsm"`` and/or ``"pgd"``.
        epsilons: perturbation budgets (L-inf, or L2 with ``norm="L2"`` for PGD); 0 gives clean accuracy.
            Default: ``[0, 0.1]`` in input units (clean, and one radius: 26/255 for images in [0, 1]);
            for token inputs the same fraction of the width of the sample's embedding values (embeddings
            have no common scale), set at setup. Each PGD epsilon costs ``pgd_steps`` gradients per
            sample, most of a pass: within the default budget every further radius cuts the samples
            attacked, the reported numbers' precision (pass a list for a curve).
        num_samples: size of the fixed evaluation sample.
        pgd_steps: PGD iterations.
        pgd_step_size: PGD step; default ``2.5 * epsilon / pgd_steps`` (Madry et al.).
        norm: PGD's norm, ``"Linf"`` or ``"L2"``.
        random_start: PGD starts at a random point of the ε-ball.
        input_range: ``[low, high]`` valid input range (``[0, 1]`` for images); default: the sample's
            observed minimum and maximum.
        min_perturbation: also search the smallest FGSM ε that flips each of ``min_perturbation_samples``
            correctly classified samples (``MinParamPerturbation``, binary search up to ``max(epsilons)``).
        min_perturbation_samples: samples searched (within a budget as many as it affords, at least
            one: ``min_perturbation.searched`` of ``wanted``).
        every_n_epochs: attack every n-th validation epoch.
        run_on: ``"validation_end"``, ``"fit_end"``, ``"test_end"`` or a list of them (named ``run_on``,
            not ``on``: YAML 1.1 reads a bare ``on:`` key as ``true``).
        seed: seed of the sample and of PGD's random start.
        max_overhead: the passes cost at most this share of the fit's own time: a due validation pass is
            cut to the samples it affords, or skipped when it cannot afford 64 and keep the cost of a
            whole final pass (counted in the report's ``overhead.skipped``); the last epoch's and the
            fit-end pass always run, on as many samples as the budget leaves (at least 64). ``None``: every pass
            attacks the whole sample. Passes outside fit (test) attack the whole sample.
        stratify: balance the sample over classes.
        batch_size: samples per attack call (``None``: all at once; within a budget, a first call of 64
            samples, timed, then one call for the samples the budget affords).
        figures: when ``robust_accuracy.png`` is drawn: ``"report"`` (when :meth:`report` is first read
            after the pass, e.g. by ``TrustReport``: a figure costs more than a small attack, and none is
            drawn during fit), ``"stage_end"`` (at the final pass) or ``"never"``.
        progress: show progress in the Trainer's progress bar style.
        batch_keys: how to read batches (see :class:`~lightning_trust.core.batch.BatchContract`).
        name: the report section (default ``"robustness"``).
    """

    report_section = "robustness"
    area = "robustness"
    logged_keys: ClassVar[dict[str, str]] = ROBUSTNESS_LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = ROBUSTNESS_REPORT_KEYS

    def __init__(
        self,
        attacks: Optional[list[str]] = None,
        epsilons: Optional[list[float]] = None,
        num_samples: int = 256,
        pgd_steps: int = 10,
        pgd_step_size: Optional[float] = None,
        norm: Literal["Linf", "L2"] = "Linf",
        random_start: bool = False,
        input_range: Optional[list[float]] = None,
        min_perturbation: bool = False,
        min_perturbation_samples: int = 16,
        every_n_epochs: int = 1,
        run_on: Union[str, list[str]] = "validation_end",
        seed: int = 0,
        max_overhead: Optional[float] = DEFAULT_MAX_OVERHEAD,
        stratify: bool = True,
        batch_size: Optional[int] = None,
        figures: Literal["report", "stage_end", "never"] = "report",
        progress: bool = True,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(run_on, every_n_epochs, name=name)
        attacks = ["fgsm", "pgd"] if attacks is None else [a.lower() for a in attacks]
        self._relative_epsilons = epsilons is None
        epsilons = list(DEFAULT_EPSILONS) if epsilons is None else [float(e) for e in epsilons]
        check_arguments(attacks, epsilons, num_samples, pgd_steps, pgd_step_size, norm, input_range,
                        min_perturbation_samples, batch_size)  # fmt: skip
        self.attacks = attacks
        self.epsilons = sorted(set(epsilons))
        self.num_samples = num_samples
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size
        self.norm = norm
        self.random_start = random_start
        self.input_range = None if input_range is None else [float(v) for v in input_range]
        self.min_perturbation = min_perturbation
        self.min_perturbation_samples = min_perturbation_samples
        self.seed = seed
        self.stratify = stratify
        self.batch_size = batch_size
        self.figures = check_figures(figures)
        self.progress = progress
        self.batch_keys = batch_keys
        self.budget = OverheadBudget(max_overhead)
        self.max_overhead = self.budget.max_overhead
        self._pass_seconds: list[float] = []  # each timed pass of the fit
        self._unit_seconds: Optional[float] = None  # seconds per sample of the last timed pass
        self._val_started: Optional[float] = None  # the validation pass's start (its rate prices the first pass)
        self._overhead: dict[str, Any] = self._account()
        self._layer: Optional[torch.nn.Module] = None  # the embedding layer token inputs are attacked through
        self._shift: Optional[int] = None
        self._prepared = False
        self._drawn: Optional[dict[str, Any]] = None
        self._owed = DeferredFigures()  # the figure, drawn when the report is read
        self.sample: Optional[AttackSample] = None
        self.order: Optional[Tensor] = None  # the order the sample is attacked in (a cut pass: a prefix)
        self.history: list[dict[str, Any]] = []
        self.last: Optional[dict[str, Any]] = None
        self._figures: dict[str, str] = {}

    # setup and the budget -------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_schedule(self.stages, pl_module, stage)
        self._prepare(trainer, pl_module, at_setup=True)

    def _prepare(self, trainer: Any, pl_module: Any, at_setup: bool = False) -> None:
        """Draw the sample (once) and check it: targets, attack space, epsilons (before any step)."""
        if self.sample is None:
            contract = BatchContract.resolve(self.batch_keys, trainer)
            loader, kind = find_loader(trainer, ("val", "test"))
            if loader is None:
                if not at_setup:  # loaders given to `trainer.test(...)` are attached after setup
                    raise ValueError(
                        "AdversarialRobustness found no validation (or test) DataLoader to draw its sample from: "
                        "give the DataModule (or the LightningModule) a `val_dataloader`."
                    )
                return
            self.sample = draw_attack_sample(loader, contract, self.num_samples, self.seed, self.stratify, source=kind)
        check_sample(self, pl_module, trainer)  # sets the embedding layer, the order, the label shift, epsilons
        self._prepared = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.start()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._overhead = self._account()  # the fit's account (its clock would run on after the fit)
        if self.last is not None and self._drawn is not self.last:  # the fit stopped early: its last pass
            self._owe_figure(trainer, self.last)

    def _account(self) -> dict[str, Any]:
        return {**self.budget.summary(), "pass_seconds": list(self._pass_seconds)}

    def _run(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        if trainer.state.fn != TrainerFn.FITTING or stage == "test_end":
            result = self._attack_and_log(trainer, pl_module, stage, hook_allows_log, None)
            self._owe_figure(trainer, result)
            return
        final = stage == "fit_end" or last_epoch(trainer)
        done = fraction_done(trainer)
        whole = len(self.sample) if self.sample is not None else self.num_samples
        minimum, unit = min(MIN_SAMPLES, whole), self._unit_seconds or self._estimate(trainer, stage)
        # a pass that is not final keeps the whole final pass's cost: the report's number comes first
        if final or unit is None or affords_pass(self.budget, unit, minimum, done, reserve_units=whole):
            before = self.budget.spent
            with self.budget.timed():
                sizer = PassSizer(self.budget, final, done, reserve_units=whole)
                result = self._attack_and_log(trainer, pl_module, stage, hook_allows_log, sizer)
                if final:  # drawn within the pass with figures="stage_end", else owed to the report
                    self._owe_figure(trainer, result)
            seconds = self.budget.spent - before
            self._pass_seconds.append(seconds)
            self._unit_seconds = seconds / max(result["samples"], 1)
        else:
            self.budget.skipped += 1
        self._overhead = self._account()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_started = self.budget.clock()

    def _estimate(self, trainer: Any, stage: str) -> Optional[float]:
        """Seconds a sample, before any pass: the validation pass's per row times the attacks' forwards."""
        rows = sum(int(n) for n in (getattr(trainer, "num_val_batches", None) or []) if n != float("inf"))
        loader, _ = find_loader(trainer, ("val",))
        size = rows * (getattr(loader, "batch_size", None) or 1)
        if stage != "validation_end" or self._val_started is None or not size:
            return None
        dataset = getattr(loader, "dataset", None)
        size = min(size, len(dataset)) if isinstance(dataset, Sized) else size
        return (self.budget.clock() - self._val_started) / size * suite_forwards(self)

    def _attack_and_log(
        self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool, sizer: Optional[PassSizer]
    ) -> dict[str, Any]:
        result = self.evaluate(pl_module, trainer, stage=stage, sizer=sizer)
        log_metrics(trainer, pl_module, logged_metrics(result), hook_allows_log)
        write_json(self.folder(trainer) / "robustness.json", {"last": result, "history": self.history})
        return result

    # the pass ---------------------------------------------------------------------------------
    def evaluate(
        self, pl_module: Any, trainer: Any = None, stage: str = "manual", sizer: Optional[PassSizer] = None
    ) -> dict[str, Any]:
        """Attack the fixed sample now (the hooks call this) and return the result dict; ``sizer``: how
        many samples the budget affords (default: the whole sample)."""
        if not self._prepared:
            self._prepare(trainer, pl_module)  # no loader at setup, or called by hand
        # validate/test hooks run under torch.inference_mode, which enable_grad alone does not lift
        with torch.inference_mode(False):
            return self._evaluate(pl_module, trainer, stage, sizer or PassSizer(self.budget, enabled=False))

    def _evaluate(self, pl_module: Any, trainer: Any, stage: str, sizer: PassSizer) -> dict[str, Any]:
        assert self.sample is not None and self.sample.targets is not None and self.order is not None
        start = time.perf_counter()
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        y = self.sample.targets.to(device).long().clone()
        n = len(y)
        with isolated_eval(pl_module, trainer, grad=True) as module:
            for p in module.parameters():
                p.requires_grad_(False)
            torch.manual_seed(self.seed)
            space = attack_space(module, _to(self.sample.inputs, device), self._layer)
            low, high = (
                (float("-inf"), float("inf")) if space.kind == "embeddings"
                else self.input_range or [float(space.start.min()), float(space.start.max())]
            )  # fmt: skip
            chunks = -(-n // (self.batch_size or n))
            total = len(self.attacks) * len(self.epsilons) * chunks + (
                self.min_perturbation_samples if self.min_perturbation else 0
            )
            with progress(trainer, total, "Adversarial robustness", self.progress) as bar:
                counts, min_result = run_attacks(self, space, y, self._shift, self.order, sizer, bar, (low, high))
        numbers = counts.results(self.attacks, self.epsilons)
        clean, robust = numbers["clean_accuracy"], numbers["robust_accuracy"]
        result: dict[str, Any] = {
            "stage": stage,
            "space": space.kind,
            "epoch": trained_epoch(trainer),
            "step": int(getattr(trainer, "global_step", 0) or 0),
            **numbers,
            "worst_accuracy": min([clean] + [v for d in robust.values() for v in d.values()]),
            "min_perturbation": min_result,
            "samples": counts.samples,
            "samples_available": n,
            "truncated": counts.samples < n,
            "seconds": time.perf_counter() - start,
        }
        self.last = result
        self.history.append({k: v for k, v in result.items() if k != "intervals"})
        return result

    # figures (drawn when the report asks) -----------------------------------------------------
    def _owe_figure(self, trainer: Any, result: dict[str, Any]) -> None:
        """The figure of ``result``: drawn now (``figures="stage_end"``) or when the report is read."""
        if self.figures == "never":
            return
        self._owed.defer("robust_accuracy", partial(self._draw, trainer, result, self.folder(trainer)))
        self._drawn = result
        if self.figures == "stage_end":
            self._owed.draw()

    def _draw(self, trainer: Any, result: dict[str, Any], folder: Path) -> None:
        curves = {a: [result["robust_accuracy"][a][eps_name(e)] for e in self.epsilons] for a in self.attacks}
        cut = f" ({result['samples']} of {result['samples_available']} samples: budget)" if result["truncated"] else ""
        title = f"Robust accuracy, epoch {result['epoch']}{cut}"
        fig = robust_accuracy_figure(self.epsilons, curves, result["clean_accuracy"], title)
        save_figure(trainer, fig, folder / "robust_accuracy.png", tag="robustness/robust_accuracy")
        self._figures["robust_accuracy"] = str(folder / "robust_accuracy.png")

    # report and checkpoint ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The last pass as plain JSON (see :attr:`report_keys`), figures under ``"figures"`` (drawing
        the one owed)."""
        self._owed.draw()
        last = self.last or {}
        return to_jsonable({
            "attacks": list(self.attacks),
            "epsilons": list(self.epsilons),
            "num_samples": len(self.sample) if self.sample is not None else self.num_samples,
            "norm": self.norm,
            "space": last.get("space"),
            "epoch": last.get("epoch"),
            "clean_accuracy": last.get("clean_accuracy"),
            "robust_accuracy": last.get("robust_accuracy", {}),
            "worst_accuracy": last.get("worst_accuracy"),
            "attack_success_rate": last.get("attack_success_rate", {}),
            "min_perturbation": last.get("min_perturbation"),
            "samples": last.get("samples"),
            "samples_available": last.get("samples_available"),
            "truncated": last.get("truncated", False),
            "intervals": last.get("intervals", {}),
            "overhead": dict(self._overhead),
            "figures": dict(self._figures),
        })  # fmt: skip

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sample": None if self.sample is None else self.sample.state(),
            "history": self.history,
            "last": self.last,
            "budget": self.budget.state_dict(),
            "pass_seconds": self._pass_seconds,
            "unit_seconds": self._unit_seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sample = state_dict.get("sample")
        self.sample = None if sample is None else AttackSample.from_state(sample)
        self.history = list(state_dict.get("history", []))
        self.last = state_dict.get("last")
        if "budget" in state_dict:
            self.budget.load_state_dict(state_dict["budget"])
        self._pass_seconds = list(state_dict.get("pass_seconds", []))
        self._unit_seconds = state_dict.get("unit_seconds")


def _to(inputs: Any, device: torch.device) -> Any:
    return map_tensors(inputs, lambda t: t.to(device).clone())
