"""Benchmark of lightning_trust.explain (CPU): what the Attribution callback costs, and ours vs Captum's.

1. Overhead of ``Attribution()`` with its defaults (``max_overhead=0.05``: the passes are spaced within
   5% of the fit's time; the final pass always runs its minimum, then explains further chunks of 8 fixed
   samples while they fit) as a fraction of fit time, on the Adult demo
   (TabularMLP), the digits demo (SmallCNN) and the text demo (TinyTextTransformer, a tiny HF BERT on
   AdultTextDataModule): fits with and without the callback, interleaved, best of ``--repeats``
   (goal <= 5%). Also what the callback's budget measured (passes run and skipped).
2. Our attributions (``Attribution.explain``: isolated pass, targets, baselines, Captum, delta) vs
   Captum called directly with the same settings on the same samples (prediction targets, zero
   baselines, n_steps=50, convergence delta): IntegratedGradients on Adult and digits, and
   LayerIntegratedGradients over the tiny BERT's input embeddings with the attention mask as an
   additional forward argument (benchmarks/text_models.py ``tiny_bert``) on the text demo; median of
   interleaved repeats (goal <= 1.05x).

    python benchmarks/explain.py            # about 5-10 minutes on a shared 2-core CPU
Writes benchmarks/results/explain.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # text_models.py, next to this file

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from captum.attr import IntegratedGradients, LayerIntegratedGradients  # noqa: E402
from text_models import TextClassifier, tiny_bert  # noqa: E402

from lightning_trust.demo import (  # noqa: E402
    AdultDataModule,
    AdultTextDataModule,
    DigitsDataModule,
    SmallCNN,
    TabularMLP,
    TinyTextTransformer,
)
from lightning_trust.explain import Attribution  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "explain.json"


def fit(make_model, make_data, callbacks, epochs, limit_train=None):
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
        limit_train_batches=limit_train,
        default_root_dir=tempfile.mkdtemp(prefix="lt_bench_explain_"),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, make_data())
    return time.perf_counter() - start, model, trainer


def overhead(name, make_model, make_data, epochs, repeats, make_callback, limit_train=None):
    base, with_cb, reports = [], [], []
    model = trainer = callback = None
    for _ in range(repeats):
        seconds, _, _ = fit(make_model, make_data, [], epochs, limit_train)
        base.append(seconds)
        callback = make_callback()
        seconds, model, trainer = fit(make_model, make_data, [callback], epochs, limit_train)
        with_cb.append(seconds)
        reports.append(callback.report())
    best_base, best_with = min(base), min(with_cb)
    report = reports[with_cb.index(best_with)]
    budget = report["budget"]
    fit_own = budget["seconds"] / budget["overhead"] if budget["overhead"] else None  # the fit without the passes
    final = budget.get("final_pass") or {}
    row = {
        "epochs": epochs,
        "fit_seconds_without": best_base,
        "fit_seconds_with": best_with,
        "overhead_fraction": best_with / best_base - 1.0,  # wall clock between runs: load-dependent
        "budget_measured_overhead": budget["overhead"],  # the goal's number: the budget's own account
        "budget_fit_seconds": fit_own,
        "budget_seconds": budget["seconds"],
        # the setup (plan, checks, the first pass's estimate) runs at fit start, outside the passes
        "overhead_with_setup": (budget["seconds"] + (budget.get("estimate_seconds") or 0.0)) / fit_own
        if fit_own
        else None,
        "passes_run": budget["runs"],
        "passes_skipped": budget["skipped"],
        "final_pass_seconds": budget["pass_seconds"][-1] if budget["pass_seconds"] else None,
        "final_pass_allowance_seconds": final.get("allowance_seconds"),
        "final_pass_minimum_seconds": final.get("minimum_seconds"),
        "final_minimum_fraction_of_fit": final["minimum_seconds"] / fit_own if final and fit_own else None,
        "final_sensitivity": final.get("sensitivity"),
        # the final pass sized in samples: chunks of 8 after its minimum while one more fits
        "final_samples": final.get("samples"),
        "samples_explained": report.get("samples_explained"),
        "num_samples": report.get("num_samples"),
        "within_budget": final.get("within_budget"),
        "figure_seconds_at_report": budget.get("figure_seconds"),  # drawn by report(), after the fit
        "first_pass_estimate_seconds": budget.get("first_pass_estimate"),
        "estimate_seconds": budget.get("estimate_seconds"),
        "skipped_passes": budget["skipped_passes"],
        "goal_overhead_fraction": 0.05,
    }
    print(f"[{name}] {row}", flush=True)
    return row, model, trainer


def _ratio(ours, direct, repeats):
    return {
        "ours_seconds_median": statistics.median(ours),
        "captum_seconds_median": statistics.median(direct),
        "ratio": statistics.median(ours) / statistics.median(direct),
        "repeats": repeats,
        "goal_ratio": 1.05,
    }


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
    return _ratio(ours, direct, repeats)


def bert_ratio(text_dm, repeats):
    """The tiny BERT (benchmarks/text_models.py) on the text demo: LayerIntegratedGradients over its
    input embeddings, the attention mask passed to Captum as an additional forward argument."""
    pl.seed_everything(0, verbose=False)
    model = TextClassifier(tiny_bert()).eval()

    class Stub:  # what `explain` reads of a Trainer outside fit
        datamodule = text_dm
        callbacks: list = []
        loggers: list = []
        current_epoch = global_step = 0
        is_global_zero = True
        progress_bar_callback = None
        train_dataloader = val_dataloaders = test_dataloaders = None

    callback = Attribution(num_samples=32, infidelity_samples=0, sensitivity_samples=0, figures="never", progress=False)
    callback.explain(model, Stub())  # draws the fixed sample and checks the setup once
    ids, mask = callback.sample.inputs, callback.sample.others["attention_mask"]
    layer = model.model.bert.embeddings.word_embeddings

    def forward(input_ids, attention_mask):
        return model(input_ids, attention_mask=attention_mask).logits

    ours, direct = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = callback.explain(model, Stub())
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            target = forward(ids, mask).argmax(dim=1)
        attributions, _ = LayerIntegratedGradients(forward, layer).attribute(
            ids, baselines=torch.zeros_like(ids), additional_forward_args=(mask,), target=target, n_steps=50,
            return_convergence_delta=True,
        )  # fmt: skip
        direct.append(time.perf_counter() - start)
    torch.testing.assert_close(result.attributions, attributions)  # same samples, same settings, same numbers
    return {**_ratio(ours, direct, repeats), "model": "tiny_bert (2 layers, 64 wide), 32 samples x 32 tokens"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ig-repeats", type=int, default=15)
    parser.add_argument("--adult-epochs", type=int, default=8)
    parser.add_argument("--digits-epochs", type=int, default=15)
    parser.add_argument("--text-epochs", type=int, default=2)
    parser.add_argument("--text-batches", type=int, default=60, help="training batches per text epoch")
    parser.add_argument(
        "--overhead-only", action="store_true", help="only part 1; keeps the vs-Captum rows of the results file"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    adult_dm = AdultDataModule(batch_size=256)
    adult_dm.setup("fit")
    digits_dm = DigitsDataModule(batch_size=64)
    digits_dm.setup("fit")
    text_dm = AdultTextDataModule(batch_size=256)
    text_dm.setup("fit")
    out: dict = {"torch_threads": torch.get_num_threads(), "defaults": "Attribution() (max_overhead=0.05)"}
    out["adult"], adult_model, adult_trainer = overhead(
        "adult", TabularMLP, lambda: adult_dm, args.adult_epochs, args.repeats, Attribution
    )
    out["digits"], digits_model, digits_trainer = overhead(
        "digits", SmallCNN, lambda: digits_dm, args.digits_epochs, args.repeats, Attribution
    )
    out["text"], _, _ = overhead(
        "text (TinyTextTransformer on AdultTextDataModule)",
        lambda: TinyTextTransformer(pretrain_if_missing=False),
        lambda: text_dm,
        args.text_epochs,
        args.repeats,
        Attribution,
        limit_train=args.text_batches,
    )
    if args.overhead_only and RESULTS.exists():
        out["vs_captum"] = json.loads(RESULTS.read_text()).get("vs_captum")
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return
    out["vs_captum"] = {
        "adult_integrated_gradients": ig_ratio(adult_model, adult_trainer, args.ig_repeats),
        "digits_integrated_gradients": ig_ratio(digits_model, digits_trainer, args.ig_repeats),
        "tiny_bert_layer_integrated_gradients": bert_ratio(text_dm, max(5, args.ig_repeats // 3)),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
