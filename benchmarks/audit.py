"""Benchmark: the one-run privacy audit (``PrivacyAudit``) against the accountant's ε.

For TabularMLP on Adult and a tiny Hugging Face BERT on the text demo, at ε in {1, 4, 8, inf} (inf:
non-private training, no ``DifferentialPrivacy``), each run twice on the same seed: with the audit
(m input canaries: held-out training rows with random labels, each put back with probability 1/2)
and without it. Measured: the audit's ε lower bound (95 % confidence, δ = 1e-5, k searched) beside
the accountant's ε; the audit's cost as the test-accuracy difference and the fit's CPU-time ratio
(with / without, one thread), and the seconds spent scoring the canaries after fit. Adult also runs
white-box Dirac gradient canaries at each finite ε (and at inf via DP with no noise).

    python benchmarks/audit.py                      # ~10 minutes on 2 shared CPU cores
    python benchmarks/audit.py --tasks adult_mlp --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "audit.json"
DELTA, SEED = 1e-5, 0
EPSILONS = (1.0, 4.0, 8.0, math.inf)
TASKS = ("adult_mlp", "text_bert")


def _setup(task: str, train_rows: Optional[int]) -> tuple[Any, Any, Any]:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Subset

    from lightning_trust.demo import AdultDataModule, AdultTextDataModule, TabularMLP

    pl.seed_everything(SEED, verbose=False)
    if task == "text_bert":
        from text_models import MAX_LENGTH, TEXT_BATCH, VOCAB, TextClassifier, tiny_bert

        dm: Any = AdultTextDataModule(batch_size=TEXT_BATCH, vocab_size=VOCAB, max_length=MAX_LENGTH)
        model: Any = TextClassifier(tiny_bert(), lr=3e-3)
    else:
        dm = AdultDataModule(batch_size=256)
        model = TabularMLP(lr=3e-3)
    dm.setup("fit")
    train = dm.train_dataset if train_rows is None else Subset(dm.train_dataset, range(train_rows))
    loader = DataLoader(train, batch_size=dm.batch_size, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    return model, dm, loader


def _accuracy(task: str, model: Any, dm: Any) -> float:
    import torch

    loader = dm.test_dataloader()
    if task == "text_bert":
        from text_models import text_accuracy

        return text_accuracy(model.model, loader)
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            right += int((model(batch["x"]).argmax(-1) == batch["y"]).sum())
            total += len(batch["y"])
    return right / total


def run(
    task: str, epsilon: float, audit: Optional[str], epochs: int, canaries: int, train_rows: Optional[int]
) -> dict[str, Any]:
    """One fit: ``audit`` None (no audit), ``"input"`` or ``"gradient"``."""
    import lightning.pytorch as pl

    from lightning_trust.privacy import DifferentialPrivacy, PrivacyAudit

    model, dm, loader = _setup(task, train_rows)
    callbacks: list[Any] = []
    dp = None
    if not math.isinf(epsilon):
        dp = DifferentialPrivacy(target_epsilon=epsilon, target_delta=DELTA, max_grad_norm=1.0)
    elif audit == "gradient":
        dp = DifferentialPrivacy(noise_multiplier=0.0, target_delta=DELTA)
    if dp is not None:
        callbacks.append(dp)
    audit_cb = PrivacyAudit(num_canaries=canaries, canaries=audit, seed=SEED) if audit else None
    if audit_cb is not None:
        callbacks.append(audit_cb)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks, default_root_dir=str(RESULTS.parent / "audit_runs"),
    )  # fmt: skip
    cpu, wall = time.thread_time(), time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    row: dict[str, Any] = {
        "task": task, "target_epsilon": None if math.isinf(epsilon) else epsilon, "audit": audit or "none",
        "fit_cpu_s": round(cpu, 2), "fit_wall_s": round(wall, 2), "steps": trainer.global_step,
        "test_accuracy": round(_accuracy(task, model, dm), 4),
        "accountant_epsilon": None if dp is None or math.isinf(dp.epsilon_spent) else round(dp.epsilon_spent, 4),
    }  # fmt: skip
    if audit_cb is not None:
        section = audit_cb.report()
        for key in ("epsilon_lower_bound", "canaries", "guesses", "correct", "k_plus", "canary_fraction"):
            row[key] = section[key]
        row["score_seconds"] = round(section["score_seconds"], 3)
        row["epsilon_lower_bound"] = round(section["epsilon_lower_bound"], 4)
    print(json.dumps(row), flush=True)
    return row


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--epochs", type=int, default=None, help="default: 4 (Adult), 6 (text)")
    parser.add_argument("--canaries", type=int, default=1000)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import warnings

    warnings.filterwarnings("ignore")
    rows, summary = [], []
    for task in args.tasks:
        epochs = args.epochs or (4 if task == "adult_mlp" else 6)
        rows_limit = None if task == "adult_mlp" else 6000  # the text BERT: a 6,000-row slice, for time
        for epsilon in EPSILONS:
            base = run(task, epsilon, None, epochs, args.canaries, rows_limit)
            audited = run(task, epsilon, "input", epochs, args.canaries, rows_limit)
            rows += [base, audited]
            entry = {
                "task": task, "target_epsilon": base["target_epsilon"], "canaries": "input",
                "accountant_epsilon": audited["accountant_epsilon"],
                "epsilon_lower_bound": audited["epsilon_lower_bound"],
                "correct_of_guesses": f"{audited['correct']}/{audited['guesses']}",
                "accuracy_without_audit": base["test_accuracy"], "accuracy_with_audit": audited["test_accuracy"],
                "accuracy_cost": round(base["test_accuracy"] - audited["test_accuracy"], 4),
                "cpu_time_ratio": round(audited["fit_cpu_s"] / base["fit_cpu_s"], 3),
                "score_seconds": audited["score_seconds"], "canary_fraction": round(audited["canary_fraction"], 4),
            }  # fmt: skip
            if task == "adult_mlp":
                white = run(task, epsilon, "gradient", epochs, args.canaries, rows_limit)
                rows.append(white)
                entry["white_box_epsilon_lower_bound"] = white["epsilon_lower_bound"]
                entry["white_box_correct_of_guesses"] = f"{white['correct']}/{white['guesses']}"
            summary.append(entry)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "audit",
                "setup": {
                    "delta": DELTA,
                    "confidence": 0.95,
                    "canaries": args.canaries,
                    "seed": SEED,
                    "guesses": "k+ = k- searched over m/2, m/4, ... with a union bound",
                    "epsilon_inf": "non-private training (input canaries); DP with no noise (gradient canaries)",
                    "text_train_rows": 6000,
                },
                "summary": summary,
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
