"""``UncertaintyEvaluation``: conformal prediction sets, calibration and shift tests, per group and domain.

Its parts: :mod:`~lightning_trust.evaluation.conformal` (MAPIE's LAC/APS/RAPS, Mondrian),
:mod:`~lightning_trust.evaluation.calibration` (temperature scaling, ECE, adaptive ECE, NLL, Brier),
:mod:`~lightning_trust.evaluation.shift` (MMD and KS tests), :mod:`~lightning_trust.evaluation.embeddings`
(the penultimate layer), :mod:`~lightning_trust.evaluation.reservoir` (bounded samples), :mod:`~lightning_trust.evaluation.sample_keys`
(the calibration split and canonical order), :mod:`~lightning_trust.evaluation.uncertainty_rows` (the kept samples),
:mod:`~lightning_trust.evaluation.uncertainty_fit` (the calibration),
:mod:`~lightning_trust.evaluation.uncertainty_results` and :mod:`~lightning_trust.evaluation.uncertainty_figures`.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, batch_size_of
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.capture import ForwardCapture, step_predictions
from lightning_trust.core.compat import Capability
from lightning_trust.core.output import DeferredFigures, artifact_dir, log_metrics, warn_once, write_json
from lightning_trust.core.seam import trained_epoch
from lightning_trust.evaluation.conformal import SCORES, ConformalPredictor
from lightning_trust.evaluation.domains import DomainIndex, side_domains
from lightning_trust.evaluation.embeddings import InputCapture, find_head, reference_embeddings
from lightning_trust.evaluation.schedule import evaluates
from lightning_trust.evaluation.uncertainty_args import check_uncertainty_arguments, scores_for
from lightning_trust.evaluation.uncertainty_figures import draw_uncertainty_figures, uncertainty_figure_paths
from lightning_trust.evaluation.uncertainty_fit import conformal_probabilities, fit_calibration, fit_predictors
from lightning_trust.evaluation.uncertainty_results import (
    CellLayout,
    calibration_results,
    conformal_results,
    logged_values,
    per_sample_logits,
    shift_pass,
    summary_of,
)
from lightning_trust.evaluation.uncertainty_rows import PassSamples, batch_rows, row_columns

__all__ = ["UncertaintyEvaluation"]


class UncertaintyEvaluation(TrustCallback):
    """Split-conformal prediction sets, temperature-scaled calibration and embedding shift tests.

    Each validation pass splits its samples by a seeded coin of their content (a sample's inputs and
    label, :mod:`~lightning_trust.evaluation.sample_keys`: the same split under any batching or
    sharding): a ``calibration_fraction`` share calibrates (the conformal quantiles with MAPIE; the
    temperature by LBFGS on the NLL), the rest is evaluated; every test pass is evaluated with the latest calibration. Coverage and mean set
    size, ECE/adaptive ECE/NLL/Brier before and after scaling are reported overall, per group of
    each ``sensitive_features`` column and per ``domain_key`` domain; the shift tests compare each
    domain's penultimate-layer embeddings with a seeded sample of the training data's.

    Memory: each process keeps at most ``max_samples`` calibration and evaluation rows each (a
    seeded reservoir: logits, label, key, codes, embedding), gathered across processes; a pass with
    more evaluates a uniform subsample (``evaluation_samples`` < ``seen_samples``, with a warning).

    Args:
        sensitive_features: side columns of group codes (names from ``datamodule.categories``).
        domain_key: side column naming each sample's domain.
        confidence_level: the target coverage ``1 - alpha`` of the prediction sets.
        scores: conformity scores: ``"lac"`` (THR), ``"aps"``, ``"raps"``; default: all three, LAC
            only for two classes (MAPIE defines APS and RAPS for more than two; asking for them on
            binary labels is refused at setup or, when the class count is unknown then, at calibration).
        mondrian: a column of ``sensitive_features`` or the ``domain_key`` to calibrate per group
            (group-conditional coverage); ``None``: one marginal calibration.
        calibration_fraction: the share of each validation pass held out to calibrate.
        include_last_label: APS/RAPS: keep the label crossing the quantile (``True``, conservative),
            drop it (``False``) or keep it at random (``"randomized"``, exact average coverage).
        temperature_scaling: fit the temperature and report the metrics after it.
        conformal_on: the probabilities the sets are built from: ``"raw"`` (the default: the softmax
            of the logits; the score does not depend on the calibration samples, so the coverage
            guarantee is exact) or ``"calibrated"`` (``softmax(logits / T)``, ``T`` fitted on the same
            calibration samples as in the RAPS authors' code: the fitted scalar makes it approximate).
        n_bins: bins of ECE, adaptive ECE and the reliability curves.
        shift_tests: ``"mmd"`` and/or ``"ks"`` (``[]``: none).
        ks_correction: ``"bonferroni"`` or ``"fdr_bh"`` (Benjamini-Hochberg).
        shift_samples: samples per side of each shift test (training reference and domain).
        n_permutations: permutations of the MMD test.
        embedding_layer: dotted path of the classifier head whose input is the embedding (default:
            the last ``nn.Linear`` with one output per class).
        max_samples: reservoir capacity per process and role.
        min_cell_samples: cells with fewer evaluated samples are left out of the worst gap.
        every_n_epochs: evaluate every n-th validation pass (and the last; test always).
        figures: ``"report"`` (drawn when the report is read) or ``"never"``.
        seed: seed of the split, the reservoirs, MAPIE and the permutations.
        batch_keys: batch contract overrides.
        name: the report section (default ``"uncertainty"``).

    Example:
        >>> callback = UncertaintyEvaluation(sensitive_features=["sex"], domain_key="native_region")
        >>> callback.report()
        {'evaluated': False}
    """

    report_section = "uncertainty"
    logged_keys: ClassVar[dict[str, str]] = {
        "uncertainty/<stage>/coverage_gap": "the worst coverage gap of the pass (stage: validate or test)",
        "uncertainty/<stage>/<score>/coverage": "the score's coverage",
        "uncertainty/<stage>/<score>/mean_set_size": "the score's mean prediction-set size",
        "uncertainty/<stage>/temperature": "the fitted temperature",
        "uncertainty/<stage>/ece_before": "ECE before temperature scaling (ece_after: after)",
    }
    report_keys: ClassVar[dict[str, str]] = {
        "conformal.coverage_gap": "target minus coverage, worst over scores, groups and domains",
        "conformal.scores.<score>.coverage": "coverage of the score's sets on the evaluated samples",
        "conformal.scores.<score>.mean_set_size": "mean prediction-set size",
        "calibration.temperature": "the fitted temperature",
        "calibration.after.ece": "ECE after temperature scaling (also adaptive_ece, nll, brier; before.*)",
        "shift.min_p_value": "smallest p-value of the shift tests over the domains",
    }

    def __init__(
        self,
        sensitive_features: list[str] = [],  # noqa: B006 - jsonargparse shows the default
        domain_key: Optional[str] = None,
        confidence_level: float = 0.9,
        scores: Optional[list[str]] = None,
        mondrian: Optional[str] = None,
        calibration_fraction: float = 0.5,
        include_last_label: Union[bool, Literal["randomized"]] = True,
        temperature_scaling: bool = True,
        conformal_on: Literal["raw", "calibrated"] = "raw",
        n_bins: int = 15,
        shift_tests: list[str] = ["mmd"],  # noqa: B006
        ks_correction: Literal["bonferroni", "fdr_bh"] = "bonferroni",
        shift_samples: int = 500,
        n_permutations: int = 500,
        embedding_layer: Optional[str] = None,
        max_samples: int = 20_000,
        min_cell_samples: int = 50,
        every_n_epochs: int = 1,
        figures: Literal["report", "never"] = "report",
        seed: int = 0,
        batch_keys: Optional[dict[str, Any]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        if importlib.util.find_spec("mapie") is None:
            raise ImportError("UncertaintyEvaluation needs MAPIE: `pip install 'lightning-trust[uncertainty]'`.")
        check_uncertainty_arguments(
            confidence_level=confidence_level, scores=scores or ["lac"], calibration_fraction=calibration_fraction,
            mondrian=mondrian, sensitive_features=sensitive_features, domain_key=domain_key, shift_tests=shift_tests,
            ks_correction=ks_correction, shift_samples=shift_samples, n_permutations=n_permutations,
            max_samples=max_samples, n_bins=n_bins, every_n_epochs=every_n_epochs, min_cell_samples=min_cell_samples,
            include_last_label=include_last_label, figures=figures, conformal_on=conformal_on,
            temperature_scaling=temperature_scaling,
        )  # fmt: skip
        self.include_last_label, self.conformal_on = include_last_label, conformal_on
        self.sensitive_features, self.domain_key = list(sensitive_features), domain_key
        self.confidence_level, self.mondrian = confidence_level, mondrian
        self.scores_arg = list(scores) if scores is not None else None
        self.scores = list(scores) if scores is not None else list(SCORES)
        self.calibration_fraction, self.temperature_scaling = calibration_fraction, temperature_scaling
        self.n_bins = n_bins
        self.shift_tests, self.ks_correction = list(shift_tests), ks_correction
        self.shift_samples, self.n_permutations, self.embedding_layer = shift_samples, n_permutations, embedding_layer
        self.max_samples, self.min_cell_samples, self.every_n_epochs = max_samples, min_cell_samples, every_n_epochs
        self.figures, self.seed, self.batch_keys = figures, seed, batch_keys
        self.columns = [*self.sensitive_features, *([domain_key] if domain_key else [])]
        self.contract = BatchContract()
        self.results: dict[str, dict[str, Any]] = {}
        self.calibration: Optional[dict[str, Any]] = None  # rows, temperature: the latest calibration
        self.figure_files: dict[str, str] = {}
        self._layout = CellLayout([], [])
        self._indexes: list[DomainIndex] = []
        self._capture = ForwardCapture()
        self._embedding: Optional[InputCapture] = None
        self._head: Any = None
        self._samples = PassSamples(max_samples, seed, calibration_fraction)
        self._predictors: dict[str, ConformalPredictor] = {}
        self._active = False
        self._pending = DeferredFigures()

    @property
    def capabilities(self) -> frozenset[Capability]:  # type: ignore[override]  # depends on the arguments
        """``EXTRA_PASSES`` with shift tests (the training reference is embedded in its own pass)."""
        return frozenset({Capability.EXTRA_PASSES}) if self.shift_tests else frozenset()

    # setup ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.contract = BatchContract.resolve(self.batch_keys, trainer, side_keys=self.columns)
        names, self._indexes = [], []
        for column in self.columns:
            codes, value_names = side_domains(column, None, trainer, self.contract)
            self._indexes.append(DomainIndex(codes))
            names.append(value_names)
        self._layout = CellLayout(self.columns, names)
        self._folder = artifact_dir(trainer, self.report_name)  # a collective under DDP: every process
        classes = getattr(getattr(trainer, "datamodule", None), "num_classes", getattr(pl_module, "num_classes", None))
        if isinstance(classes, int):
            self.scores = scores_for(classes, self.scores_arg)
        if self.shift_tests:
            _, self._head = find_head(pl_module, classes if isinstance(classes, int) else None, self.embedding_layer)
            self._embedding = InputCapture(self._head)
        if self.calibration is not None and not self._predictors:
            self._fit_predictors()  # restored from a checkpoint

    # hooks ------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, RunningStage.VALIDATING)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, RunningStage.TESTING)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._arm(pl_module, batch, dataloader_idx)

    @override
    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._arm(pl_module, batch, dataloader_idx)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, calibrating=True)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, calibrating=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._calibrate(trainer, pl_module)
            self._finish(trainer, pl_module, RunningStage.VALIDATING)
        self._active = False

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, pl_module, RunningStage.TESTING)
        self._active = False

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._capture.disarm()
        if self._embedding is not None:
            self._embedding.disarm()

    # the pass ---------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, stage: RunningStage) -> None:
        self._active = not trainer.sanity_checking and evaluates(trainer, stage, self.every_n_epochs)
        if stage == RunningStage.TESTING and self._active and self.calibration is None:
            raise RuntimeError(
                "UncertaintyEvaluation has no calibration for this test pass: it calibrates on a validation pass. Run "
                "`trainer.fit` or `trainer.validate` first with the same callback (or load its checkpoint)."
            )
        self._samples.reset(trained_epoch(trainer))

    def _arm(self, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if not self._active or dataloader_idx != 0:
            return
        size = batch_size_of(batch, self.contract, missing_ok=True)
        self._capture.arm(pl_module, size)
        if self._embedding is not None:
            self._embedding.arm(size)

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int, dataloader_idx: int, calibrating: bool) -> None:  # fmt: skip
        if not self._active or dataloader_idx != 0:
            self._capture.disarm()
            return
        logits = per_sample_logits(step_predictions(self._capture, self.contract, pl_module, batch, outputs, trainer))
        rows = batch_rows(self.contract, batch, logits, self.seed, self.columns, self._indexes)
        if self._embedding is not None:
            embedding = self._embedding.take()
            if embedding is None:
                raise RuntimeError(
                    f"UncertaintyEvaluation: the head {self.embedding_layer or type(self._head).__name__} was not "
                    "called on the batch in the step's forward; set `embedding_layer` to the classifier head."
                )
            rows["embedding"] = embedding
        self._samples.add(rows, calibrating)

    # calibration ------------------------------------------------------------------------------
    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        classes, _ = self._samples.shapes(trainer, pl_module.device)
        rows = self._samples.gathered_calibration(trainer, row_columns(classes, len(self.columns), None),
                                                  pl_module.device)  # fmt: skip
        self.calibration = fit_calibration(rows, confidence_level=self.confidence_level,
                                           temperature_scaling=self.temperature_scaling, epoch=trained_epoch(trainer),
                                           seen=self._samples.calibration.seen)  # fmt: skip
        self._fit_predictors()

    def _mondrian_groups(self, codes: Tensor) -> Optional[Tensor]:
        return None if self.mondrian is None else codes[:, self.columns.index(self.mondrian)]

    def _fit_predictors(self) -> None:
        assert self.calibration is not None
        self.scores = scores_for(int(self.calibration["rows"]["logits"].shape[1]), self.scores_arg)
        self._predictors = fit_predictors(
            self.calibration, self.scores, confidence_level=self.confidence_level, seed=self.seed,
            include_last_label=self.include_last_label, conformal_on=self.conformal_on,
            mondrian_column=None if self.mondrian is None else self.columns.index(self.mondrian),
        )  # fmt: skip

    # evaluation -------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage) -> None:
        assert self.calibration is not None
        classes, width = self._samples.shapes(trainer, pl_module.device)
        hidden = width if self._embedding is not None else None
        local = self._samples.local_evaluation(row_columns(classes, len(self.columns), hidden), pl_module.device)
        gathered = self._samples.gathered_evaluation(trainer, local)
        seen_n, kept_n = self._samples.evaluation_counts(trainer, pl_module.device)
        if kept_n < seen_n:
            warn_once(self, f"subsampled {stage.value}", (
                f"UncertaintyEvaluation: the {stage.value} pass evaluated a uniform sample of {kept_n} of its {seen_n} "
                f"samples (`max_samples={self.max_samples}` per process); raise `max_samples` to evaluate all."
            ))  # fmt: skip
        temperature = self.calibration["temperature"]
        probs = conformal_probabilities(gathered["logits"], temperature, self.conformal_on)
        conformal = conformal_results(
            self._predictors, probs, gathered["target"], self._layout.membership(gathered["codes"]),
            self._mondrian_groups(gathered["codes"]), self._layout, self.confidence_level, self.min_cell_samples,
        )  # fmt: skip
        calibration, bins = calibration_results(local["logits"], local["target"], self._layout.membership(local["codes"]),
                                                self._layout, temperature, self.n_bins, classes)  # fmt: skip
        gaps = [(v["coverage_gap"], s) for s, v in conformal.items() if v["coverage_gap"] is not None]
        result: dict[str, Any] = {
            "stage": stage.value, "epoch": trained_epoch(trainer), "step": int(trainer.global_step),
            "seen_samples": seen_n, "evaluation_samples": kept_n,
            "conformal": {
                "confidence_level": self.confidence_level, "mondrian": self.mondrian, "conformal_on": self.conformal_on,
                "calibration_samples": len(self.calibration["rows"]["target"]),
                "calibration_epoch": self.calibration["epoch"],
                "coverage_gap": max(gaps)[0] if gaps else None, "worst_score": max(gaps)[1] if gaps else None,
                "scores": conformal,
            },
            "calibration": {"temperature": temperature, **summary_of(calibration), "cells": calibration,
                            "reliability": bins},
            "shift": self._shift(trainer, pl_module, gathered, hidden, stage),
        }  # fmt: skip
        self.results[stage.value] = result
        self._publish(trainer, pl_module, stage, result)

    def _shift(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gathered: dict[str, Tensor],
               hidden: Optional[int], stage: RunningStage) -> dict[str, Any]:  # fmt: skip
        if not self.shift_tests or self._embedding is None:
            return {"tested": False, "reason": "no shift tests requested", "domains": {}}
        reference = reference_embeddings(trainer, pl_module, self._head, self.contract, self.shift_samples, self.seed)
        names = self._layout.value_names[-1] if self.domain_key else [stage.value]
        return shift_pass(trainer, gathered, reference, hidden or 0, self.domain_key is not None, names,
                          tests=self.shift_tests, samples=self.shift_samples, n_permutations=self.n_permutations,
                          correction=self.ks_correction, seed=self.seed)  # fmt: skip

    # output -----------------------------------------------------------------------------------
    def _publish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage, result: dict[str, Any]
    ) -> None:
        prefix = f"{self.report_name}/{stage.value}"
        logged = logged_values(prefix, result)
        log_metrics(trainer, pl_module, logged, hook_allows_log=True)
        write_json(self._folder / f"uncertainty_{stage.value}.json", result)
        if self.figures == "report":
            columns = list(self.columns)
            self.figure_files.update(uncertainty_figure_paths(self._folder, columns, stage.value))
            cells_of = {c: self._layout.cells_of(c) for c in columns}
            self._pending.defer(stage.value, partial(draw_uncertainty_figures, trainer, self._folder, result, columns,
                                                     cells_of, stage.value))  # fmt: skip

    def report(self) -> dict[str, Any]:
        """The latest evaluation (test when run, else validation) as plain JSON; figures drawn now."""
        latest = self.results.get(RunningStage.TESTING.value) or self.results.get(RunningStage.VALIDATING.value)
        if latest is None:
            return {"evaluated": False}
        self._pending.draw()
        out = {"evaluated": True, **{k: v for k, v in latest.items()}, "figures": dict(self.figure_files)}
        out["calibration"] = {k: v for k, v in latest["calibration"].items() if k != "reliability"}
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "calibration": self.calibration, "figures": self.figure_files}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.calibration = state_dict.get("calibration")
        self.figure_files = dict(state_dict.get("figures", {}))
        self._predictors = {}
        if self.calibration is not None:
            self._fit_predictors()
