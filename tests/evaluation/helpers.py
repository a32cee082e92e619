"""Reference numbers from scikit-learn/torchmetrics for the evaluation tests (the Trainer is tests/support.py's)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score
from torchmetrics.functional.classification import multiclass_calibration_error


def probabilities(model: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(inputs).softmax(dim=1).numpy()


def reference_metrics(probs: np.ndarray, target: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """The metrics computed directly with scikit-learn (and torchmetrics for ECE) on one domain's arrays."""
    out = {
        "accuracy": accuracy_score(target, probs.argmax(1)),
        "nll": log_loss(target, probs, labels=list(range(probs.shape[1]))),
        "ece": float(
            multiclass_calibration_error(
                torch.from_numpy(probs), torch.from_numpy(target), probs.shape[1], n_bins=n_bins
            )
        ),
    }
    if probs.shape[1] == 2:
        out["f1"] = f1_score(target, probs.argmax(1), zero_division=0)
        if len(np.unique(target)) == 2:
            out["auroc"] = roc_auc_score(target, probs[:, 1])
    return out
