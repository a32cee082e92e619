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
from lightning_trust.core.output import log_metrics, save_figure, write_json
from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.seam import trained_epoch
from lightning_trust.core.tensors import map_tensors, to_jsonable
from lightning_trust.evaluation.tokens import label_shift
from lightning_trust.explain.keys import ROBUSTNESS_LOGGED_KEYS, ROBUSTNESS_REPORT_KEYS
from lightning_trust.explain.plots import robust_accuracy_figure
from lightning_trust.explain.progress import progress
from lightning_trust.explain.robustness_checks import (
    attacked_range,
    check_epsilons,
    check_schedule,
    check_targets,
    embedding_layer,
)
from lightning_trust.explain.robustness_inputs import (
    AttackSample,
    attack_loss,
    attack_space,
    correct,
    draw_attack_sample,
    min_perturbation,
)
from lightning_trust.explain.schedule import ScheduledPass

__all__ = ["ATTACKS", "AdversarialRobustness", "eps_name"]

ATTACKS: tuple[str, ...] = ("fgsm", "pgd")
#: Default budgets: input units, or fractions of the embedding values' width for token inputs.
DEFAULT_EPSILONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)


def eps_name(eps: float) -> str:
    """ε as written in report keys and metric names: ``0.1``, ``0``, ``0.03``."""
    return f"{float(eps):g}"


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
    ``robustness.json``, figure ``robust_accuracy.png``. Under DDP only rank zero attacks.

    Args:
        attacks: ``"fgsm"`` and/or ``"pgd"``.
        epsilons: perturbation budgets (L-inf, or L2 with ``norm="L2"`` for PGD); 0 gives clean accuracy.
            Default: ``[0, 0.05, 0.1, 0.2]`` in input units; for token inputs the same fractions of the
            width of the sample's embedding values (embeddings have no common scale), set at setup.
        num_samples: size of the fixed evaluation sample.
        pgd_steps: PGD iterations.
        pgd_step_size: PGD step; default ``2.5 * epsilon / pgd_steps`` (Madry et al.).
        norm: PGD's norm, ``"Linf"`` or ``"L2"``.
        random_start: PGD starts at a random point of the ε-ball.
        input_range: ``[low, high]`` valid input range (``[0, 1]`` for images); default: the sample's
            observed minimum and maximum.
        min_perturbation: also search the smallest FGSM ε that flips each of ``min_perturbation_samples``
            correctly classified samples (``MinParamPerturbation``, binary search up to ``max(epsilons)``).
        min_perturbation_samples: samples searched.
        every_n_epochs: attack every n-th validation epoch.
        run_on: ``"validation_end"``, ``"fit_end"``, ``"test_end"`` or a list of them (named ``run_on``,
            not ``on``: YAML 1.1 reads a bare ``on:`` key as ``true``).
        seed: seed of the sample and of PGD's random start.
        max_overhead: the passes cost at most this share of the fit's own time: a due validation pass is
            skipped when it would exceed it (counted in the report's ``overhead.skipped``); the last
            epoch's and the fit-end pass always run. ``None``: every pass.
        stratify: balance the sample over classes.
        batch_size: samples per attack call (``None``: all at once).
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
        progress: bool = True,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(run_on, every_n_epochs, name=name)
        attacks = ["fgsm", "pgd"] if attacks is None else [a.lower() for a in attacks]
        self._relative_epsilons = epsilons is None
        epsilons = list(DEFAULT_EPSILONS) if epsilons is None else [float(e) for e in epsilons]
        if not attacks or any(a not in ATTACKS for a in attacks) or len(set(attacks)) != len(attacks):
            raise ValueError(f"`attacks` must be distinct names among {list(ATTACKS)}, got {attacks}.")
        if not epsilons or any(e < 0 for e in epsilons):
            raise ValueError(f"`epsilons` must be a non-empty list of budgets >= 0, got {epsilons}.")
        if num_samples < 1 or pgd_steps < 1 or min_perturbation_samples < 1:
            raise ValueError("`num_samples`, `pgd_steps` and `min_perturbation_samples` must be positive integers.")
        if pgd_step_size is not None and pgd_step_size <= 0:
            raise ValueError(
                f"`pgd_step_size` must be positive (or None for 2.5 * epsilon / pgd_steps), got {pgd_step_size}."
            )
        if norm not in ("Linf", "L2"):
            raise ValueError(f"`norm` must be 'Linf' or 'L2', got {norm!r}.")
        if input_range is not None and (len(input_range) != 2 or not input_range[0] < input_range[1]):
            raise ValueError(f"`input_range` must be [low, high] with low < high, got {input_range}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size}.")
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
        self.progress = progress
        self.batch_keys = batch_keys
        self.budget = OverheadBudget(max_overhead)
        self.max_overhead = self.budget.max_overhead
        self._pass_seconds: list[float] = []  # each timed pass of the fit
        self._overhead: dict[str, Any] = self._account()
        self._layer: Optional[torch.nn.Module] = None  # the embedding layer token inputs are attacked through
        self._shift: Optional[int] = None
        self._prepared = False
        self._drawn: Optional[dict[str, Any]] = None
        self.sample: Optional[AttackSample] = None
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
        self._layer = embedding_layer(self.sample, pl_module, self.input_range)
        check_targets(self.sample, pl_module, self._layer, trainer)
        targets = self.sample.targets
        assert targets is not None
        self._shift = label_shift("auto", self.sample.inputs, targets) if targets.ndim == 2 else None
        if self._shift is not None and self.min_perturbation:
            raise ValueError(
                "`min_perturbation` searches the smallest epsilon that flips a sample's class, but the targets are "
                "per token (a language model): set `min_perturbation=False`."
            )
        space = "embeddings" if self._layer is not None else "inputs"
        low, high = attacked_range(self.sample, self._layer, self.input_range)
        if space == "embeddings" and self._relative_epsilons:
            self.epsilons = [float(f"{f * (high - low):.3g}") for f in DEFAULT_EPSILONS]
        check_epsilons(self.epsilons, low, high, space=space)
        self._prepared = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.start()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._overhead = self._account()  # the fit's account (its clock would run on after the fit)
        if self.last is not None and self._drawn is not self.last:  # the fit stopped early: draw its last pass
            self._draw(trainer, self.last, self.folder(trainer))

    def _account(self) -> dict[str, Any]:
        return {**self.budget.summary(), "pass_seconds": list(self._pass_seconds)}

    def _run(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool) -> None:
        if trainer.state.fn != TrainerFn.FITTING or stage == "test_end":
            self._attack_and_log(trainer, pl_module, stage, hook_allows_log, draw=True)
            return
        final = stage == "fit_end" or _last_epoch(trainer)
        if self.budget.allows(final=final):
            before = self.budget.spent
            with self.budget.timed():  # the figure of the final pass only: a figure costs more than a small attack
                self._attack_and_log(trainer, pl_module, stage, hook_allows_log, draw=final)
            self._pass_seconds.append(self.budget.spent - before)
        self._overhead = self._account()

    def _attack_and_log(self, trainer: Any, pl_module: Any, stage: str, hook_allows_log: bool, draw: bool) -> None:
        result = self.evaluate(pl_module, trainer, stage=stage)
        metrics: dict[str, Optional[float]] = {
            "robustness/clean_acc": result["clean_accuracy"],
            "robustness/worst_acc": result["worst_accuracy"],
        }
        for attack in self.attacks:
            for eps in self.epsilons:
                name = eps_name(eps)
                metrics[f"robustness/{attack}/acc@{name}"] = result["robust_accuracy"][attack][name]
                metrics[f"robustness/{attack}/success@{name}"] = result["attack_success_rate"][attack][name]
        if result.get("min_perturbation"):
            metrics["robustness/min_perturbation"] = result["min_perturbation"]["median"]
        log_metrics(trainer, pl_module, metrics, hook_allows_log)
        folder = self.folder(trainer)
        write_json(folder / "robustness.json", {"last": result, "history": self.history})
        if draw:
            self._draw(trainer, result, folder)

    # the pass ---------------------------------------------------------------------------------
    def evaluate(self, pl_module: Any, trainer: Any = None, stage: str = "manual") -> dict[str, Any]:
        """Attack the fixed sample now (the hooks call this) and return the result dict."""
        if not self._prepared:
            self._prepare(trainer, pl_module)  # no loader at setup, or called by hand
        # validate/test hooks run under torch.inference_mode, which enable_grad alone does not lift
        with torch.inference_mode(False):
            return self._evaluate(pl_module, trainer, stage)

    def _evaluate(self, pl_module: Any, trainer: Any, stage: str) -> dict[str, Any]:
        from captum.robust import FGSM, PGD

        assert self.sample is not None and self.sample.targets is not None
        start = time.perf_counter()
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        y = self.sample.targets.to(device).long().clone()
        n = len(y)
        size = self.batch_size or n
        parts = [slice(i, min(i + size, n)) for i in range(0, n, size)]
        robust: dict[str, dict[str, float]] = {a: {} for a in self.attacks}
        success: dict[str, dict[str, Optional[float]]] = {a: {} for a in self.attacks}
        min_result = None
        with isolated_eval(pl_module, trainer, grad=True) as module:
            for p in module.parameters():
                p.requires_grad_(False)
            torch.manual_seed(self.seed)
            space = attack_space(module, _to(self.sample.inputs, device), self._layer)
            low, high = (
                (float("-inf"), float("inf")) if space.kind == "embeddings"
                else self.input_range or [float(space.start.min()), float(space.start.max())]
            )  # fmt: skip
            x = space.start.detach().clone()

            def extras(s: slice) -> Optional[tuple[Tensor, ...]]:
                return tuple(e[s] for e in space.extras) or None

            def mask(s: slice) -> Optional[Tensor]:
                return space.mask[s] if space.mask is not None else None

            def predict(values: Tensor) -> Tensor:
                with torch.no_grad():
                    return torch.cat([
                        correct(space.forward(values[s], *(extras(s) or ())), y[s], self._shift) for s in parts
                    ])  # fmt: skip

            clean_correct = predict(x)
            loss = attack_loss(self._shift)
            fgsm = FGSM(space.forward, loss_func=loss, lower_bound=low, upper_bound=high)
            pgd = PGD(space.forward, loss_func=loss, lower_bound=low, upper_bound=high)
            total = len(self.attacks) * len(self.epsilons) + (
                self.min_perturbation_samples if self.min_perturbation else 0
            )
            with progress(trainer, total, "Adversarial robustness", self.progress) as bar:
                for attack in self.attacks:
                    for eps in self.epsilons:
                        if eps == 0:  # no attack: the sample within the bounds, no gradient needed
                            adv = x.clamp(low, high)
                        elif attack == "fgsm":
                            adv = torch.cat([
                                fgsm.perturb(x[s].clone().requires_grad_(), epsilon=eps, target=y[s],
                                             additional_forward_args=extras(s), mask=mask(s))
                                for s in parts
                            ])  # fmt: skip
                        else:
                            step = self.pgd_step_size if self.pgd_step_size is not None else 2.5 * eps / self.pgd_steps
                            adv = torch.cat([
                                pgd.perturb(x[s].clone().requires_grad_(), radius=eps, step_size=step, step_num=self.pgd_steps, target=y[s],
                                            additional_forward_args=extras(s), random_start=self.random_start, norm=self.norm,
                                            mask=mask(s))
                                for s in parts
                            ])  # fmt: skip
                        right = predict(adv.detach())
                        robust[attack][eps_name(eps)] = float(right.float().mean())
                        flipped = (clean_correct & ~right).sum()
                        base = clean_correct.sum()
                        success[attack][eps_name(eps)] = float(flipped / base) if base > 0 else None
                        bar.advance()
                if self.min_perturbation:
                    min_result = min_perturbation(
                        space, fgsm, x, y, clean_correct, bar, max(self.epsilons), self.min_perturbation_samples
                    )
        clean = float(clean_correct.float().mean())
        result: dict[str, Any] = {
            "stage": stage,
            "space": space.kind,
            "epoch": trained_epoch(trainer),
            "step": int(getattr(trainer, "global_step", 0) or 0),
            "clean_accuracy": clean,
            "robust_accuracy": robust,
            "worst_accuracy": min([clean] + [v for d in robust.values() for v in d.values()]),
            "attack_success_rate": success,
            "min_perturbation": min_result,
            "seconds": time.perf_counter() - start,
        }
        self.last = result
        self.history.append({k: v for k, v in result.items()})
        return result

    def _draw(self, trainer: Any, result: dict[str, Any], folder: Path) -> None:
        curves = {a: [result["robust_accuracy"][a][eps_name(e)] for e in self.epsilons] for a in self.attacks}
        title = f"Robust accuracy, epoch {result['epoch']}"
        fig = robust_accuracy_figure(self.epsilons, curves, result["clean_accuracy"], title)
        save_figure(trainer, fig, folder / "robust_accuracy.png", tag="robustness/robust_accuracy")
        self._figures["robust_accuracy"] = str(folder / "robust_accuracy.png")
        self._drawn = result

    # report and checkpoint ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The last pass as plain JSON (see :attr:`report_keys`), figures under ``"figures"``."""
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


def _last_epoch(trainer: Any) -> bool:
    steps_done = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    return steps_done or (trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs)


def _to(inputs: Any, device: torch.device) -> Any:
    return map_tensors(inputs, lambda t: t.to(device).clone())
