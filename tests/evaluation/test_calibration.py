"""Temperature scaling and calibration metrics against torchmetrics and hand computations."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_trust.evaluation.calibration import AdaptiveCalibrationError, CalibrationCells, fit_temperature


def _logits(n=500, c=3, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    labels = torch.multinomial((logits / scale).softmax(1), 1, generator=g).reshape(-1)  # overconfident by `scale`
    return logits, labels


def test_temperature_minimizes_the_nll_over_a_fine_grid():
    logits, labels = _logits()
    t = fit_temperature(logits, labels)
    grid = np.linspace(0.5, 6.0, 2201)
    nll = [float(torch.nn.functional.cross_entropy(logits.double() / g, labels)) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nll))], abs=0.003)
    assert t == pytest.approx(3.0, rel=0.2)  # the labels were drawn at temperature 3


def test_cells_before_and_after_equal_torchmetrics_and_hand_formulas():
    logits, labels = _logits(seed=1)
    member = torch.stack([torch.ones(500, dtype=torch.bool), torch.arange(500) % 3 == 0], dim=1)
    cells = CalibrationCells(["overall", "g"], 3, 10, torch.device("cpu"))
    cells.update(logits[:200], labels[:200], member[:200], 2.5)
    cells.update(logits[200:], labels[200:], member[200:], 2.5)
    values, bins = cells.compute([500, int(member[:, 1].sum())], fitted=True)
    for phase, t in (("before", 1.0), ("after", 2.5)):
        for c, mask in ((0, member[:, 0]), (1, member[:, 1])):
            probs, y = (logits[mask] / t).softmax(1), labels[mask]
            got = values[["overall", "g"][c]][phase]
            assert got["ece"] == pytest.approx(float(multiclass_calibration_error(probs, y, 3, n_bins=10)), abs=1e-6)
            p = probs.double().numpy()
            assert got["nll"] == pytest.approx(-np.log(p[np.arange(len(y)), y.numpy()]).mean(), rel=1e-6)
            onehot = np.eye(3)[y.numpy()]
            assert got["brier"] == pytest.approx(((p - onehot) ** 2).sum(1).mean(), rel=1e-5)
    assert sum(bins["g"]["after"]["count"]) == int(member[:, 1].sum())


def test_adaptive_ece_by_hand_with_equal_mass_bins():
    probs = torch.rand(103, 4, generator=torch.Generator().manual_seed(2)).softmax(1)
    labels = torch.randint(0, 4, (103,), generator=torch.Generator().manual_seed(3))
    m = AdaptiveCalibrationError(n_bins=5)
    m.update(probs[:50], labels[:50])
    m.update(probs[50:], labels[50:])
    conf, pred = probs.max(1)
    order = np.argsort(conf.numpy(), kind="stable")
    total = 0.0
    for b in range(5):
        idx = order[(np.arange(103) * 5) // 103 == b]
        total += len(idx) / 103 * abs((pred[idx] == labels[idx]).float().mean() - conf[idx].mean()).item()
    assert float(m.compute()) == pytest.approx(total, abs=1e-6)


def test_temperature_fits_under_inference_mode():
    logits, labels = _logits(seed=4)
    with torch.inference_mode():
        inside = fit_temperature(logits * 1.0, labels)
    assert inside == pytest.approx(fit_temperature(logits, labels))
