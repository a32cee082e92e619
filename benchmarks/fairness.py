"""Fairness benchmark: the overhead of FairnessMetrics (per-group count tables), its state memory,
and mitigation on Adult.

    python benchmarks/fairness.py [--repeats 5] [--epochs 5] [--lam 2.0] [--skip-mitigation]

1. Fit overhead at defaults (goal <= 5 % of fit time; the bar charts are drawn when the report
   is read, timed apart as ``report_with_charts_seconds``): ``trainer.fit`` with and without
   ``FairnessMetrics`` (sex only; sex, race and sex x race) on the Adult demo (TabularMLP, 2
   epochs) and on the text demo (a tiny Hugging Face BERT, ``text_models.tiny_bert()``, on
   ``AdultTextDataModule``; 150 training batches, the full validation split each epoch). Two
   numbers: the callback's own hook time over the fit time (timed inside its hooks: robust on a
   shared machine) and the wall-time difference of alternating runs (medians).
2. Validation-pass overhead: ``trainer.validate`` of TabularMLP on Adult's validation split (3,016
   rows) and on the test split as a larger validation set (15,060 rows), with the epoch-end
   computation alone.
3. State memory: bytes of every tensor in the count state after validating 100 ... 15,060 rows.
4. Mitigation table (test split, by sex): no mitigation / FairnessPenalty / ThresholdOptimizer
   (examples/fairness_adult.py).

Writes benchmarks/results/fairness.json and prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl
import torch

from lightning_trust.demo import AdultDataModule, AdultTextDataModule, TabularMLP
from lightning_trust.fairness import FairnessMetrics
from lightning_trust.fairness.tables import fairness_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_models import TextClassifier, tiny_bert

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
        # the epoch-end part alone: the numbers from the count tables of the last run
        for name, entries in ENTRIES.items():
            cb = FairnessMetrics(entries)
            _validate_named(model, loader_fn(), cb, dm)
            counts = cb._collector.counts
            flat = counts.compute()[0].numpy()
            ts = []
            for _ in range(repeats):
                start = time.perf_counter()
                fairness_results(flat, None, counts.layout, cb._collector.names, cb.metrics)
                ts.append(time.perf_counter() - start)
            row[name]["epoch_end_seconds"] = statistics.median(ts)
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


class TimedFairness(FairnessMetrics):
    """FairnessMetrics with its own hook time accumulated (what it adds to the fit)."""

    seconds = 0.0


def _timed(method_name: str):
    def hook(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return getattr(FairnessMetrics, method_name)(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    return hook


for _hook in (
    "setup", "on_train_start", "on_validation_epoch_start", "on_validation_batch_start", "on_validation_batch_end",
    "on_validation_epoch_end", "on_fit_end",
):  # fmt: skip
    setattr(TimedFairness, _hook, _timed(_hook))


class TextClassifierWithValidation(TextClassifier):
    """The benchmark BERT with the validation step its users write (loss logged, no predictions returned)."""

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, batch["labels"]), batch_size=len(logits))


def _fit_once(make_model, dm, callbacks, trainer_kwargs) -> tuple[float, float]:
    """Fit seconds, and the seconds of the reports read afterwards (FairnessMetrics draws its charts then)."""
    pl.seed_everything(0, verbose=False)
    model = make_model()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, callbacks=callbacks, default_root_dir=root, **trainer_kwargs,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(model, dm)
        fit = time.perf_counter() - start
        start = time.perf_counter()
        for callback in callbacks:
            callback.report()
        return fit, time.perf_counter() - start


def fit_overhead(repeats: int) -> dict:
    """Fit time with and without FairnessMetrics at defaults, on the Adult and the text demo."""
    torch.set_num_threads(1)
    demos = {
        "adult_tabular_mlp": (TabularMLP, AdultDataModule(batch_size=256), {"max_epochs": 2}),
        "text_tiny_bert": (
            lambda: TextClassifierWithValidation(tiny_bert()),
            AdultTextDataModule(batch_size=64),
            {"max_epochs": 2, "limit_train_batches": 150},
        ),
    }
    out = {}
    for demo, (make_model, dm, kwargs) in demos.items():
        dm.setup("fit")
        _fit_once(make_model, dm, [], kwargs)  # warm-up
        times: dict[str, list[float]] = {"plain": [], **{k: [] for k in ENTRIES}}
        hooks: dict[str, list[float]] = {k: [] for k in ENTRIES}
        charts: dict[str, list[float]] = {k: [] for k in ENTRIES}
        state: dict[str, int] = {}
        for _ in range(repeats):
            times["plain"].append(_fit_once(make_model, dm, [], kwargs)[0])
            for name, entries in ENTRIES.items():
                cb = TimedFairness(entries)
                cb.seconds = 0.0
                seconds, report_seconds = _fit_once(make_model, dm, [cb], kwargs)
                times[name].append(seconds)
                charts[name].append(report_seconds)
                hooks[name].append(cb.seconds / seconds)
                state[name] = cb.report()["state_bytes"]
        plain = statistics.median(times["plain"])
        row: dict = {"plain_fit_seconds": plain, "val_rows": len(dm.val_dataloader().dataset), **kwargs}
        for name in ENTRIES:
            t = statistics.median(times[name])
            row[name] = {
                "fit_seconds": t,
                "hook_fraction_of_fit": statistics.median(hooks[name]),
                "wall_overhead": t / plain - 1.0,
                "state_bytes": state[name],
                "report_with_charts_seconds": statistics.median(charts[name]),
            }
        out[demo] = row
    return out


def state_memory() -> dict:
    """Bytes of the count state after validating 100 ... 15,060 rows (sex, race, sex x race; with and without 100
    bootstrap replicates)."""
    dm = AdultDataModule(batch_size=256)
    dm.setup("fit")
    model = TabularMLP()
    test = dm.test_dataloader().dataset
    out = {}
    for n_boot in (None, 100):
        rows_bytes = {}
        for rows in (100, 1_000, 10_000, len(test)):
            subset = torch.utils.data.Subset(test, range(rows))
            loader = torch.utils.data.DataLoader(subset, batch_size=256)
            cb = FairnessMetrics(ENTRIES["sex+race+sex*race"], n_boot=n_boot)
            _validate_named(model, loader, cb, dm)
            assert cb.report()["num_samples"] == rows
            rows_bytes[str(rows)] = cb.report()["state_bytes"]
        out[f"n_boot={n_boot}"] = rows_bytes
    return out


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--skip-mitigation", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    results = {
        "fit_overhead": fit_overhead(args.repeats),
        "validation_overhead": overhead(args.repeats),
        "state_memory_bytes": state_memory(),
    }
    if not args.skip_mitigation:
        results["mitigation"] = mitigation(args.epochs, args.lam)
    results["goal"] = {"fit_overhead_max": 0.05, "state_memory": "the same bytes for every number of rows"}
    results["benchmark_seconds"] = time.perf_counter() - start
    out = ROOT / "benchmarks" / "results" / "fairness.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
