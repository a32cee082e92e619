"""Cost of CrossDomainEvaluation vs a plain validation pass over the same samples, and Adult's per-region table.

    python benchmarks/evaluation.py

A TabularMLP is trained briefly on Adult; then `trainer.validate` runs over the 15,060-row test split
(used as the validation loader) without and with the callback (per-region accuracy, nll, ECE; and
the full metric set), alternating, and the median times are compared (goal <= 1.1x). Each callback
is reused across the repeats, as across the epochs of a fit, so its metric objects are built once. JSON goes to
benchmarks/results/evaluation.json.
"""

from __future__ import annotations

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

from lightning_trust.demo import AdultDataModule, TabularMLP  # noqa: E402
from lightning_trust.evaluation import CrossDomainEvaluation  # noqa: E402

REPEATS = 7


def _trainer(root: str, callbacks: list) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, callbacks=callbacks)  # fmt: skip


def main() -> dict:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    dm = AdultDataModule(batch_size=256)
    dm.setup("fit")
    model = TabularMLP()
    root = tempfile.mkdtemp()
    pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=root).fit(model, dm)  # fmt: skip
    loader = dm.test_dataloader()  # 15,060 rows, the pass whose cost we compare

    def timed(callbacks: list) -> float:
        trainer = _trainer(root, callbacks)
        trainer.datamodule = None
        start = time.perf_counter()
        trainer.validate(model, dataloaders=loader, verbose=False)
        return time.perf_counter() - start

    def callback(metrics: list[str]) -> CrossDomainEvaluation:
        return CrossDomainEvaluation(domain_key="native_region", domain_values=[0, 1, 2, 3, 4], in_domain=[0],
                                     metrics=metrics, figures=False)  # fmt: skip

    # one callback per configuration, reused like across the epochs of a fit (its metrics are built once)
    basic_cb = callback(["accuracy", "nll", "ece"])
    last = callback(["accuracy", "f1", "auroc", "nll", "ece"])
    timed([]), timed([basic_cb]), timed([last])  # warm-up
    plain, basic, full = [], [], []
    for _ in range(REPEATS):
        plain.append(timed([]))
        basic.append(timed([basic_cb]))
        full.append(timed([last]))
    report = last.report()
    names = dm.categories["native_region"]
    table = {names[int(d)]: {**v, "samples": report["sizes"][d]} for d, v in report["per_domain"].items()}
    t_plain, t_basic, t_full = (statistics.median(v) for v in (plain, basic, full))
    result = {
        "samples": len(loader.dataset),
        "plain_validate_s": t_plain,
        "cross_domain_validate_s": t_basic,
        "cross_domain_full_metrics_validate_s": t_full,
        "overhead_ratio": t_basic / t_plain,
        "overhead_ratio_full_metrics": t_full / t_plain,
        "goal_ratio": 1.1,
        "adult_test_per_region": table,
        "summary": {k: report[k] for k in ("average", "weighted_average", "worst", "in_domain", "ood", "ood_gap")},
        "worst_region": {m: names[int(d)] for m, d in report["worst_domain"].items()},
    }
    out = Path(__file__).parent / "results" / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
