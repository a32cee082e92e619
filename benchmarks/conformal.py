"""Conformal coverage per domain on the Adult and text demos: is the coverage within 1 point of the
target on every domain with >= 500 calibration samples?

    python benchmarks/conformal.py            # about 10 minutes on a shared 2-core CPU
    python benchmarks/conformal.py --quick    # Adult only, 2 splits

Each demo's model is trained once (Adult: TabularMLP, 5 epochs; text: the tiny BERT of
benchmarks/text_models.py, 150 batches). The datamodules hold out half of Adult's training file as
validation (``val_fraction=0.5``) so that more regions reach 500 calibration samples. Then, for each
seeded calibration split, ``UncertaintyEvaluation`` (LAC, 90 %, ``calibration_fraction=0.9``)
calibrates on the validation pass, Mondrian per ``native_region`` and marginally, and
``trainer.test`` evaluates on the 15,060-row test file. The criterion is judged on each domain's
coverage averaged over the splits (conformal's guarantee is on that expectation; one split's
coverage on a few hundred test samples has a standard error of ~1.3 points) and each split's
values are kept. JSON goes to benchmarks/results/conformal.json.
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

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_trust.demo import AdultDataModule, AdultTextDataModule, TabularMLP  # noqa: E402
from lightning_trust.evaluation.uncertainty import UncertaintyEvaluation  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_models import MAX_LENGTH, TEXT_BATCH, VOCAB, TextClassifier, tiny_bert  # noqa: E402

TARGET = 0.9
MIN_CALIBRATION = 500


def _trainer(root: str, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, callbacks=callbacks, **kwargs)  # fmt: skip


class ValidatedText(TextClassifier):
    """The benchmark's BERT classifier with validation and test steps returning the logits."""

    def validation_step(self, batch, batch_idx):
        return {"logits": self(batch["input_ids"], batch["attention_mask"]).logits}

    def test_step(self, batch, batch_idx):
        return {"logits": self(batch["input_ids"], batch["attention_mask"]).logits}


def _demo(name: str):
    if name == "adult":
        return TabularMLP(), AdultDataModule(batch_size=256, val_fraction=0.5), {"max_epochs": 5}
    dm = AdultTextDataModule(batch_size=TEXT_BATCH, vocab_size=VOCAB, max_length=MAX_LENGTH, val_fraction=0.5)
    return ValidatedText(tiny_bert()), dm, {"max_epochs": 1, "limit_train_batches": 150}


def run_demo(name: str, splits: int, root: str) -> dict:
    pl.seed_everything(0)
    model, dm, fit_kwargs = _demo(name)
    started = time.perf_counter()
    _trainer(root, [], limit_val_batches=0, **fit_kwargs).fit(model, dm)
    fit_seconds = time.perf_counter() - started
    per_split: dict[str, list] = {"mondrian": [], "marginal": []}
    for seed in range(splits):
        for mode in per_split:
            cb = UncertaintyEvaluation(domain_key="native_region", scores=["lac"], confidence_level=TARGET,
                                       mondrian="native_region" if mode == "mondrian" else None,
                                       calibration_fraction=0.9, shift_tests=[], figures="never", seed=seed)  # fmt: skip
            t = _trainer(root, [cb])
            t.validate(model, dm)
            started = time.perf_counter()
            t.test(model, dm)
            seconds = time.perf_counter() - started
            report = cb.report()
            lac = report["conformal"]["scores"]["lac"]
            sizes = lac["calibration_sizes"]  # per Mondrian group (code index), or {0: all} marginally
            names = [c for c in lac["cells"] if c.startswith("native_region=")]
            per_split[mode].append({
                "seed": seed, "test_seconds": seconds, "calibration_samples": report["conformal"]["calibration_samples"],
                "domains": {n.partition("=")[2]: {
                    "coverage": lac["cells"][n]["coverage"], "mean_set_size": lac["cells"][n]["mean_set_size"],
                    "test_samples": lac["cells"][n]["samples"],
                    "calibration_samples": sizes.get(i, 0) if mode == "mondrian" else None,
                } for i, n in enumerate(names)},
                "overall": {"coverage": lac["coverage"], "mean_set_size": lac["mean_set_size"]},
            })  # fmt: skip
    summary: dict = {}
    for mode, runs in per_split.items():
        domains = {}
        for domain in runs[0]["domains"]:
            covs = [r["domains"][domain]["coverage"] for r in runs if r["domains"][domain]["coverage"] is not None]
            cal = [r["domains"][domain]["calibration_samples"] for r in runs]
            mean = statistics.fmean(covs) if covs else None
            domains[domain] = {
                "mean_coverage": mean, "coverages": covs,
                "mean_set_size": statistics.fmean(r["domains"][domain]["mean_set_size"] or 0 for r in runs),
                "test_samples": runs[0]["domains"][domain]["test_samples"],
                "calibration_samples": min(cal) if mode == "mondrian" else None,
                "within_1_point": None if mean is None else abs(mean - TARGET) <= 0.01,
            }  # fmt: skip
        judged = {d: v for d, v in domains.items() if (v["calibration_samples"] or 0) >= MIN_CALIBRATION}
        summary[mode] = {
            "domains": domains,
            "judged_domains": sorted(judged),
            "criterion_met": all(v["within_1_point"] for v in judged.values()) if judged else None,
            "overall_mean_coverage": statistics.fmean(r["overall"]["coverage"] for r in runs),
        }
    return {"fit_seconds": fit_seconds, "splits": splits, "summary": summary, "runs": per_split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Adult only, 2 splits")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "conformal.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"target": TARGET, "min_calibration_samples": MIN_CALIBRATION, "score": "lac", "demos": {}}
    with tempfile.TemporaryDirectory() as root:
        for name, splits in (("adult", 2),) if args.quick else (("adult", 5), ("text", 3)):
            results["demos"][name] = run_demo(name, splits, root)
            s = results["demos"][name]["summary"]["mondrian"]
            print(name, "mondrian criterion:", s["criterion_met"], "judged:", s["judged_domains"],
                  {d: round(v["mean_coverage"] or 0, 4) for d, v in s["domains"].items()}, flush=True)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
