"""Benchmark of lightning_trust.explain (CPU): what the Attribution callback costs, and our IG vs Captum's.

1. Overhead of ``Attribution()`` with its defaults as a fraction of fit time, on Adult (TabularMLP) and
   digits (SmallCNN): fits with and without the callback, interleaved, best of ``--repeats``
   (goal <= 5%). Also the time the callback itself measured in its passes ("accounted"), and the
   digits setting of ``configs/digits_explain.yaml`` (every 3rd epoch, 32 IG steps).
2. Our integrated gradients (``Attribution.explain``: isolated pass, targets, baselines, Captum, delta)
   vs Captum's ``IntegratedGradients`` called directly with the same settings (prediction targets,
   zero baselines, n_steps=50, convergence delta), on the trained models: median of interleaved
   repeats (goal <= 1.05x).

    python benchmarks/explain.py            # about 2-4 minutes on a shared 2-core CPU
Writes benchmarks/results/explain.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from captum.attr import IntegratedGradients  # noqa: E402

from lightning_trust.demo import AdultDataModule, DigitsDataModule, SmallCNN, TabularMLP  # noqa: E402
from lightning_trust.explain import Attribution  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "explain.json"


def fit(make_model, make_data, callbacks, epochs):
    pl.seed_everything(0, verbose=False)
    model = make_model()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tempfile.mkdtemp(prefix="lt_bench_explain_"),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, make_data())
    return time.perf_counter() - start, model, trainer


def overhead(name, make_model, make_data, epochs, repeats, make_callback):
    base, with_cb, accounted = [], [], []
    model = trainer = None
    for _ in range(repeats):
        seconds, _, _ = fit(make_model, make_data, [], epochs)
        base.append(seconds)
        callback = make_callback()
        seconds, model, trainer = fit(make_model, make_data, [callback], epochs)
        with_cb.append(seconds)
        accounted.append(callback.total_seconds)
    best_base, best_with = min(base), min(with_cb)
    row = {
        "epochs": epochs,
        "fit_seconds_without": best_base,
        "fit_seconds_with": best_with,
        "overhead_fraction": best_with / best_base - 1.0,
        "accounted_seconds": min(accounted),
        "accounted_fraction": min(accounted) / best_base,
        "passes": len(callback.history),
        "goal_overhead_fraction": 0.05,
    }
    print(f"[{name}] {row}", flush=True)
    return row, model, trainer


def ig_ratio(model, trainer, repeats):
    callback = Attribution(num_samples=32, infidelity_samples=0, sensitivity_samples=0, figures="never", progress=False)
    callback.explain(model, trainer)  # draws the fixed sample once
    x = callback.sample.inputs
    ours, direct = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = callback.explain(model, trainer)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            target = model(x).argmax(dim=1)
        attributions, _ = IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=target, n_steps=50, return_convergence_delta=True
        )
        direct.append(time.perf_counter() - start)
    torch.testing.assert_close(result.attributions, attributions)  # same settings, same numbers
    return {
        "ours_seconds_median": statistics.median(ours),
        "captum_seconds_median": statistics.median(direct),
        "ratio": statistics.median(ours) / statistics.median(direct),
        "repeats": repeats,
        "goal_ratio": 1.05,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ig-repeats", type=int, default=15)
    parser.add_argument("--adult-epochs", type=int, default=3)
    parser.add_argument("--digits-epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    adult_dm = AdultDataModule(batch_size=256)
    adult_dm.setup("fit")
    digits_dm = DigitsDataModule(batch_size=64)
    digits_dm.setup("fit")
    out: dict = {"torch_threads": torch.get_num_threads(), "defaults": "Attribution()"}
    out["adult"], adult_model, adult_trainer = overhead(
        "adult", TabularMLP, lambda: adult_dm, args.adult_epochs, args.repeats, Attribution
    )
    out["digits"], digits_model, digits_trainer = overhead(
        "digits", SmallCNN, lambda: digits_dm, args.digits_epochs, args.repeats, Attribution
    )
    out["digits_config_settings"], _, _ = overhead(
        "digits (configs/digits_explain.yaml settings)",
        SmallCNN,
        lambda: digits_dm,
        args.digits_epochs,
        args.repeats,
        lambda: Attribution(every_n_epochs=3, method_kwargs={"n_steps": 32, "internal_batch_size": 512}),
    )
    out["ig_vs_captum"] = {
        "adult": ig_ratio(adult_model, adult_trainer, args.ig_repeats),
        "digits": ig_ratio(digits_model, digits_trainer, args.ig_repeats),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
