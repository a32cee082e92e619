"""Fairness benchmark: the validation-epoch overhead of FairnessMetrics, and mitigation on Adult.

    python benchmarks/fairness.py [--repeats 7] [--epochs 5] [--lam 2.0]

1. Overhead: ``trainer.validate`` of TabularMLP on Adult with and without ``FairnessMetrics``
   (sex only; sex, race and sex x race), alternating runs, median wall time; on the validation split
   (3,016 rows) and on the test split used as a larger validation set (15,060 rows). Also the
   epoch-end MetricFrame time alone. Goal: <= 5 % overhead.
2. Mitigation table (test split, by sex): accuracy, demographic parity difference and equalized
   odds difference for no mitigation / FairnessPenalty / ThresholdOptimizer (examples/fairness_adult.py).

Writes benchmarks/results/fairness.json and prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_trust.demo import AdultDataModule, TabularMLP
from lightning_trust.fairness import FairnessMetrics
from lightning_trust.fairness.frame import fairness_results

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {"sex": ["sex"], "sex+race+sex*race": ["sex", "race", ["sex", "race"]]}


def _validate(model: TabularMLP, loader, callbacks: list) -> float:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.validate(model, loader, verbose=False)
    return time.perf_counter() - start


def overhead(repeats: int) -> dict:
    torch.set_num_threads(1)
    dm = AdultDataModule(batch_size=256)
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    model = TabularMLP()
    out = {}
    for split, loader_fn in (("validation", dm.val_dataloader), ("test_as_validation", dm.test_dataloader)):
        times: dict[str, list[float]] = {"plain": [], **{k: [] for k in ENTRIES}}
        _validate(model, loader_fn(), [])  # warm-up
        for _ in range(repeats):
            times["plain"].append(_validate(model, loader_fn(), []))
            for name, entries in ENTRIES.items():
                cb = FairnessMetrics(entries, log_groups=True)
                # the DataLoader alone has no categories: give the callback the datamodule's names
                times[name].append(_validate_named(model, loader_fn(), cb, dm))
        plain = statistics.median(times["plain"])
        row = {"rows": len(loader_fn().dataset), "plain_seconds": plain}
        for name in ENTRIES:
            t = statistics.median(times[name])
            row[name] = {"seconds": t, "overhead": t / plain - 1.0}
        # the epoch-end part alone: MetricFrame tables from arrays already gathered
        ds = loader_fn().dataset.tensors
        y = ds["y"].numpy()
        rng = np.random.default_rng(0)
        pred = rng.integers(0, 2, len(y))
        codes = torch.stack([ds["sex"], ds["race"]], 1).numpy()
        for name, entries in ENTRIES.items():
            parsed = [[e] if isinstance(e, str) else e for e in entries]
            ts = []
            for _ in range(repeats):
                start = time.perf_counter()
                fairness_results(
                    y,
                    pred,
                    codes,
                    parsed,
                    ["sex", "race"],
                    dm.categories,
                    ["accuracy", "selection_rate", "true_positive_rate", "false_positive_rate"],
                )
                ts.append(time.perf_counter() - start)
            row[name]["metricframe_seconds"] = statistics.median(ts)
        out[split] = row
    return out


def _validate_named(model, loader, callback, dm) -> float:
    class Named(pl.LightningDataModule):
        categories = dm.categories

        def val_dataloader(self):
            return loader

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.validate(model, datamodule=Named(), verbose=False)
    return time.perf_counter() - start


def mitigation(epochs: int, lam: float) -> dict:
    spec = importlib.util.spec_from_file_location("fairness_adult", ROOT / "examples" / "fairness_adult.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as root:
        results = example.compare(epochs=epochs, lam=lam, root=root)
    results["markdown"] = example.markdown(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lam", type=float, default=2.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    results = {"overhead": overhead(args.repeats), "mitigation": mitigation(args.epochs, args.lam)}
    results["goal"] = {"overhead_max": 0.05}
    results["benchmark_seconds"] = time.perf_counter() - start
    out = ROOT / "benchmarks" / "results" / "fairness.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
