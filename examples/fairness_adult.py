"""Fairness on Adult: no mitigation vs. an in-processing penalty vs. post-processing thresholds.

    python examples/fairness_adult.py                     # 5 epochs, penalty lam=2, by sex
    python examples/fairness_adult.py --lam 4 --constraint equalized_odds --epochs 3

Trains TabularMLP twice (plain; with FairnessPenalty) with FairnessMetrics on validation and test;
the plain run also carries a ThresholdOptimizer (it does not change training, so its "before" is the
plain model and its "after" the post-processed one). Prints accuracy, demographic parity difference
and equalized odds difference on the test split for the three, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_trust.demo import AdultDataModule, TabularMLP
from lightning_trust.fairness import FairnessMetrics, FairnessPenalty, ThresholdOptimizer

COLUMNS = ("accuracy", "demographic_parity_difference", "equalized_odds_difference")


def _run(root: Path, epochs: int, seed: int, extra: list[pl.Callback]) -> tuple[FairnessMetrics, float]:
    pl.seed_everything(seed, verbose=False)
    metrics = FairnessMetrics(["sex", "race", ["sex", "race"]], stages=["validation", "test"])
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        default_root_dir=str(root),
        callbacks=[metrics, *extra],
        logger=pl.loggers.CSVLogger(str(root), name=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model, data = TabularMLP(), AdultDataModule(batch_size=256, seed=seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-group flags and the like are in the reports
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        trainer.test(model, data, verbose=False)
    return metrics, seconds


def compare(
    epochs: int = 5,
    lam: float = 2.0,
    constraint: str = "demographic_parity",
    seed: int = 0,
    root: str = "runs/fairness_adult",
) -> dict[str, Any]:
    """Test-split accuracy and disparities (by sex) for no mitigation, the penalty and the ThresholdOptimizer."""
    optimizer = ThresholdOptimizer("sex", constraint=constraint)
    plain, plain_seconds = _run(Path(root) / "none", epochs, seed, [optimizer])
    penalty = FairnessPenalty("sex", constraint=constraint, lam=lam)  # type: ignore[arg-type]
    fair, fair_seconds = _run(Path(root) / "penalty", epochs, seed, [penalty])

    def by_sex(report: dict[str, Any]) -> dict[str, float]:
        sex = report["by_feature"]["sex"]
        return {"accuracy": report["overall"]["accuracy"], **{k: sex[k] for k in COLUMNS[1:]}}

    after = optimizer.report()["after"]
    return {
        "settings": {
            "epochs": epochs,
            "lam": lam,
            "constraint": constraint,
            "seed": seed,
            "split": "test",
            "feature": "sex",
        },
        "none": {**by_sex(plain.report()), "fit_seconds": plain_seconds},
        "penalty": {**by_sex(fair.report()), "fit_seconds": fair_seconds},
        "threshold_optimizer": {k: after[k] for k in COLUMNS},
        "worst_over_sex_race_intersection": {
            "none": {k: plain.report()[k] for k in COLUMNS[1:]},
            "penalty": {k: fair.report()[k] for k in COLUMNS[1:]},
        },
        "thresholds": optimizer.thresholds,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = ["| mitigation | accuracy | demographic parity diff. | equalized odds diff. |", "|---|---|---|---|"]
    for name in ("none", "penalty", "threshold_optimizer"):
        row = results[name]
        lines.append(
            f"| {name} | {row['accuracy']:.4f} | {row['demographic_parity_difference']:.4f} | {row['equalized_odds_difference']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--constraint", choices=["demographic_parity", "equalized_odds"], default="demographic_parity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="runs/fairness_adult")
    args = parser.parse_args()
    results = compare(args.epochs, args.lam, args.constraint, args.seed, args.root)
    print(markdown(results))
    out = Path(args.root) / "comparison.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
