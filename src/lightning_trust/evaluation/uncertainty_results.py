"""The numbers of one uncertainty evaluation: conformal coverage and set size, calibration before
and after temperature scaling, and shift tests, per cell (overall, each group, each domain).

A *cell* is ``"overall"`` or ``"<column>=<value>"`` of a side column (a sensitive feature or the
domain key). The calibration metrics are count states of each process's own samples (synced);
the conformal sets, the shift tests and the calibration fit use the samples gathered from every
process in canonical order, so every process reports the numbers one process would.

Example:
    >>> layout = CellLayout(["sex"], [["Female", "Male"]])
    >>> layout.names
    ['overall', 'sex=Female', 'sex=Male']
    >>> layout.membership(torch.tensor([[0], [1], [2]])).int().tolist()  # 2: a value not evaluated
    [[1, 1, 0], [1, 0, 1], [1, 0, 0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_trust.evaluation.calibration import CalibrationCells
from lightning_trust.evaluation.conformal import ConformalPredictor, SetCounts, coverage_rows
from lightning_trust.evaluation.reservoir import gather_rows
from lightning_trust.evaluation.shift import ks_test, mmd_test
from lightning_trust.evaluation.uncertainty_fit import canonical_order

__all__ = [
    "CellLayout",
    "calibration_results",
    "conformal_results",
    "logged_values",
    "per_sample_logits",
    "shift_pass",
    "shift_results",
    "summary_of",
    "worst_gap",
]


class CellLayout:
    """The cells of the side ``columns`` (each with its value names, in index order)."""

    def __init__(self, columns: Sequence[str], names: Sequence[Sequence[str]]) -> None:
        self.columns = list(columns)
        self.value_names = [list(n) for n in names]
        self.names = ["overall"] + [f"{c}={v}" for c, vs in zip(self.columns, self.value_names) for v in vs]
        self.column_of = [None] + [c for c, vs in zip(self.columns, self.value_names) for _ in vs]

    def membership(self, codes: Tensor) -> Tensor:
        """``(n, cells)`` booleans from each sample's value index per column ``(n, columns)``."""
        parts = [torch.ones(codes.shape[0], 1, dtype=torch.bool, device=codes.device)]
        for j, values in enumerate(self.value_names):
            k = len(values)
            parts.append(torch.nn.functional.one_hot(codes[:, j].clamp(max=k), k + 1)[:, :k].bool())
        return torch.cat(parts, dim=1)

    def cells_of(self, column: str) -> list[str]:
        return [n for n, c in zip(self.names, self.column_of) if c == column]


def worst_gap(cells: Mapping[str, Mapping[str, Any]], min_samples: int) -> tuple[Optional[float], Optional[str]]:
    """The largest coverage gap over cells with at least ``min_samples`` evaluated samples."""
    eligible = [(v["coverage_gap"], n) for n, v in cells.items() if v["samples"] >= min_samples]
    if not eligible:
        return None, None
    gap, name = max(eligible, key=lambda item: item[0])
    return float(gap), name


def conformal_results(
    predictors: Mapping[str, ConformalPredictor], probs: np.ndarray, target: Tensor, membership: Tensor,
    mondrian_groups: Optional[Tensor], layout: CellLayout, confidence_level: float, min_samples: int,
) -> dict[str, Any]:  # fmt: skip
    """Each score's coverage, mean set size and gap per cell of the sets of ``probs`` (the
    probabilities the predictors were conformalized on) of the evaluation rows gathered from every
    process in canonical order: every process predicts the same sets (MAPIE's randomized
    ``include_last_label`` draws by position) and counts them without a further reduction."""
    groups = None if mondrian_groups is None else mondrian_groups.cpu().numpy()
    out: dict[str, Any] = {}
    for score, predictor in predictors.items():
        counts = SetCounts(len(layout.names), sync_on_compute=False).to(target.device)
        sets = torch.as_tensor(predictor.predict_sets(probs, groups), device=target.device)
        counts.update(sets, target, membership)
        cells = coverage_rows(layout.names, counts.compute(), confidence_level)
        gap, worst = worst_gap(cells, min_samples)
        overall = cells["overall"]
        out[score] = {
            "coverage": overall["coverage"], "mean_set_size": overall["mean_set_size"], "coverage_gap": gap,
            "worst_cell": worst, "quantiles": {str(k): v for k, v in predictor.quantiles().items()},
            "full_set_groups": list(predictor.full_set_groups), "calibration_sizes": dict(predictor.calibration_sizes),
            "failures": dict(predictor.failures), "cells": cells,
        }  # fmt: skip
    return out


def calibration_results(
    logits: Tensor, target: Tensor, membership: Tensor, layout: CellLayout, temperature: Optional[float],
    n_bins: int, num_classes: int,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """``(values, reliability bins)`` of every cell before and after temperature scaling."""
    cells = CalibrationCells(layout.names, num_classes, n_bins, logits.device)
    cells.update(logits, target, membership, temperature)
    sizes = membership.long().sum(dim=0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sizes)
    return cells.compute([int(s) for s in sizes.tolist()], temperature is not None)


def shift_results(
    reference: Optional[Tensor], embeddings: Tensor, domain_index: Optional[Tensor], domain_names: Sequence[str],
    tests: Sequence[str], samples: int, n_permutations: int, correction: str, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Each domain's two-sample tests against the training reference (gathered samples, at most
    ``samples`` a side: the reservoirs are uniform, so their first rows are a uniform subsample)."""
    if reference is None or len(reference) < 2:
        return {"tested": False, "reason": "no training embeddings (no map-style training dataset)", "domains": {}}
    ref = reference[:samples].double().cpu().numpy()
    out: dict[str, Any] = {}
    for d, name in enumerate(domain_names):
        rows = embeddings if domain_index is None else embeddings[domain_index == d]
        if len(rows) < 2:
            out[name] = {"tested": False, "n_domain": len(rows)}
            continue
        data = rows[:samples].double().cpu().numpy()
        out[name] = {"tested": True}
        for test in tests:
            if test == "mmd":
                out[name]["mmd"] = mmd_test(ref, data, n_permutations=n_permutations, seed=seed)
            else:
                out[name]["ks"] = ks_test(ref, data, correction=correction)
    p_values = [v[t]["p_value"] for v in out.values() if v.get("tested") for t in tests]
    return {"tested": True, "tests": list(tests), "domains": out,
            "min_p_value": min(p_values) if p_values else None,
            "shifted_domains": [n for n, v in out.items() if v.get("tested") and any(v[t]["p_value"] < 0.05 for t in tests)]}  # fmt: skip


def summary_of(calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The overall before/after values and the largest after-scaling ECE over the cells."""
    overall = calibration["overall"]
    after = [(v["after"]["ece"], n) for n, v in calibration.items() if v["after"]["ece"] is not None]
    worst = max(after, key=lambda item: item[0]) if after else (None, None)
    return {"before": overall["before"], "after": overall["after"], "worst_ece": worst[0], "worst_ece_cell": worst[1]}


def per_sample_logits(preds: Tensor) -> Tensor:
    """``(N, C)`` logits; one logit column (a binary model) becomes ``[0, z]``."""
    if preds.ndim == 1 or (preds.ndim == 2 and preds.shape[1] == 1):
        z = preds.reshape(-1, 1).float()
        return torch.cat([torch.zeros_like(z), z], dim=1)
    if preds.ndim != 2:
        raise ValueError(
            f"UncertaintyEvaluation needs one prediction per sample, (N, C) logits; got {tuple(preds.shape)} "
            "(token-level outputs). Evaluate a sequence classifier, or return per-sample logits from the step."
        )
    return preds.detach()


def logged_values(prefix: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers logged for a pass: the worst gap, temperature, ECE before/after, each score's
    coverage and mean set size."""
    calibration = result["calibration"]
    logged = {
        f"{prefix}/coverage_gap": result["conformal"]["coverage_gap"],
        f"{prefix}/temperature": calibration["temperature"],
        f"{prefix}/ece_after": calibration["after"]["ece"],
        f"{prefix}/ece_before": calibration["before"]["ece"],
    }
    for score, values in result["conformal"]["scores"].items():
        logged[f"{prefix}/{score}/coverage"] = values["coverage"]
        logged[f"{prefix}/{score}/mean_set_size"] = values["mean_set_size"]
    return logged


def shift_pass(
    trainer: Any, gathered: Mapping[str, Tensor], reference: Optional[tuple[Tensor, Tensor]], width: int, by_domain: bool,
    names: Sequence[str], *, tests: Sequence[str], samples: int, n_permutations: int, correction: str, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The shift tests of a pass: the evaluated rows ``gathered`` from every process (canonical
    order) against this process's training reference ``(embeddings, positions in the seeded
    order)`` gathered and sorted by position, then :func:`shift_results` (the domain is the last
    code column): the same samples in the same order as one process would test."""
    device = gathered["logits"].device
    ref_local = {"e": torch.empty(0, width, device=device), "key": torch.empty(0, dtype=torch.long, device=device)}
    if reference is not None:
        ref_local = {"e": reference[0].to(device), "key": reference[1].to(device)}
    ref = canonical_order(gather_rows(trainer.strategy, trainer.world_size, ref_local, device))["e"]
    index = gathered["codes"][:, -1] if by_domain else None
    return shift_results(ref if len(ref) else None, gathered["embedding"], index, names, tests, samples,
                         n_permutations, correction, seed)  # fmt: skip
