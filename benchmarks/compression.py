"""Compression benchmark: dense vs Lightning's ModelPruning (same parameter budget) vs ours
(ProgressivePruning; ProgressivePruning + QuantizationAwareTraining int8), on SmallCNN/digits and
TabularMLP/Adult, in one run. CPU latency is measured single-threaded in this process, back to back.

    python benchmarks/compression.py            # a few minutes on a 2-core CPU
    python benchmarks/compression.py --quick    # fewer epochs (smoke run)

Goals (issue #7): 50% channel pruning >= 2x CPU speedup with <= 1 point accuracy loss; int8 >= 3x
faster and >= 3.5x smaller than fp32 with <= 0.5 point loss.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_trust.compression import (
    ProgressivePruning,
    QuantizationAwareTraining,
    count_macs_params,
    load_int8_model,
)
from lightning_trust.compression.export import plain_forward
from lightning_trust.compression.measure import collect_predictions, measure_latency
from lightning_trust.core.batch import BatchContract
from lightning_trust.demo import AdultDataModule, DigitsDataModule, SmallCNN, TabularMLP

RESULTS = Path(__file__).parent / "results"


def _trainer(root: Path, epochs: int, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
                      callbacks=callbacks, num_sanity_val_steps=0)  # fmt: skip


def _accuracy(model: Any, datamodule: pl.LightningDataModule) -> float:
    preds, target = collect_predictions(
        {"m": model}, [datamodule.test_dataloader()], BatchContract.resolve(None, None), torch.device("cpu")
    )
    return float((preds["m"] == target).float().mean())


def _file_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save({k: v for k, v in model.state_dict().items()}, buffer)
    return len(buffer.getvalue())


def _weights(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def run_case(
    name: str, make_model: Any, datamodule: pl.LightningDataModule, x: torch.Tensor, plan: dict[str, int], root: Path
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {}
    epochs = plan["epochs"]

    def describe(model: nn.Module, accuracy: float, file_bytes: int, nonzero: int) -> dict[str, Any]:
        with plain_forward(model):
            macs, params = count_macs_params(model, x[:1])
        return {"params": params, "nonzero_params": nonzero, "macs_per_sample": macs, "file_bytes": file_bytes,
                "accuracy": accuracy}  # fmt: skip

    # dense ------------------------------------------------------------------------------------
    pl.seed_everything(0)
    dense = make_model()
    t0 = time.perf_counter()
    _trainer(root / "dense", epochs, []).fit(dense, datamodule)
    dense.eval()
    runners["dense"] = dense
    rows["dense"] = describe(dense, _accuracy(dense, datamodule), _file_bytes(dense),
                             sum(int((p != 0).sum()) for p in dense.parameters()))  # fmt: skip
    rows["dense"]["train_s"] = time.perf_counter() - t0

    # ours: ProgressivePruning then QAT + int8 ------------------------------------------------
    pl.seed_everything(0)
    ours = make_model()
    pruning = ProgressivePruning(pruning_ratio=0.5, schedule="cubic", start_epoch=plan["prune_start"], end_epoch=plan["prune_end"],
                                 measure_latency=False)  # fmt: skip
    qat = QuantizationAwareTraining(start_epoch=plan["qat_start"], freeze_observers_epoch=plan["freeze"], freeze_bn_epoch=plan["freeze"],
                                    export_path=str(root / f"{name}_int8.pt2"), measure_latency=False)  # fmt: skip
    t0 = time.perf_counter()
    _trainer(root / "ours", epochs, [pruning, qat]).fit(ours, datamodule)
    train_s = time.perf_counter() - t0
    with plain_forward(ours):
        pruned = copy.deepcopy(ours).eval()
    runners["ours_pruned"] = pruned
    rows["ours_pruned"] = describe(pruned, _accuracy(pruned, datamodule), _file_bytes(pruned),
                                   sum(int((p != 0).sum()) for p in pruned.parameters()))  # fmt: skip
    rows["ours_pruned"]["train_s"] = train_s
    int8 = load_int8_model(qat.export_file, compile=True)  # as a user gets it: from the exported file
    runners["ours_pruned_int8"] = int8
    q = qat.report()
    rows["ours_pruned_int8"] = {
        "params": rows["ours_pruned"]["params"], "macs_per_sample": rows["ours_pruned"]["macs_per_sample"],
        "file_bytes": os.path.getsize(qat.export_file),
        "weight_bytes_int8": q["size_int8_bytes"], "weight_bytes_fp32": q["size_fp32_bytes"],
        "accuracy": _accuracy(int8, datamodule), "agreement_with_fake_quant": q.get("agreement"),
    }  # fmt: skip

    # Lightning's ModelPruning at the same parameter budget ------------------------------------
    budget = rows["ours_pruned"]["params"] / rows["dense"]["params"]
    prunable = sum(m.weight.numel() for m in _weights(make_model()).values())
    amount = min(1.0, (rows["dense"]["params"] - rows["ours_pruned"]["params"]) / prunable)
    pl.seed_everything(0)
    peer = make_model()
    peer_cb = ModelPruning("l1_unstructured", amount=lambda epoch: amount if epoch == plan["prune_end"] else 0.0,
                           use_global_unstructured=True, verbose=0)  # fmt: skip
    t0 = time.perf_counter()
    _trainer(root / "peer", epochs, [peer_cb]).fit(peer, datamodule)
    peer.eval()
    runners["lightning_model_pruning"] = peer
    rows["lightning_model_pruning"] = describe(peer, _accuracy(peer, datamodule), _file_bytes(peer),
                                               sum(int((p != 0).sum()) for p in peer.parameters()))  # fmt: skip
    rows["lightning_model_pruning"]["train_s"] = time.perf_counter() - t0
    rows["lightning_model_pruning"]["amount"] = amount

    # latency: all rows back to back, in 5 alternating rounds, best median kept (the CPU is shared)
    best = {key: float("inf") for key in runners}
    for _ in range(5):
        for key, runner in runners.items():
            best[key] = min(best[key], measure_latency(runner, x, min_run_time=0.4))
    for key, seconds in best.items():
        rows[key]["latency_ms"] = seconds * 1e3
    d = rows["dense"]
    for row in rows.values():
        row["speedup_vs_dense"] = d["latency_ms"] / row["latency_ms"]
        row["file_size_ratio_vs_dense"] = d["file_bytes"] / row["file_bytes"]
        row["accuracy_change_points"] = 100 * (row["accuracy"] - d["accuracy"])
    p, i = rows["ours_pruned"], rows["ours_pruned_int8"]
    goals = {
        "pruning_speedup_ge_2x": p["speedup_vs_dense"] >= 2.0,
        "pruning_accuracy_loss_le_1pt": p["accuracy_change_points"] >= -1.0,
        "int8_speedup_vs_fp32_pruned_ge_3x": p["latency_ms"] / i["latency_ms"] >= 3.0,
        "int8_weights_smaller_ge_3_5x": i["weight_bytes_fp32"] / i["weight_bytes_int8"] >= 3.5,
        "int8_accuracy_loss_vs_fp32_pruned_le_0_5pt": 100 * (i["accuracy"] - p["accuracy"]) >= -0.5,
    }
    return {"param_budget": budget, "rows": rows,
            "int8_vs_fp32_pruned": {"speedup": p["latency_ms"] / i["latency_ms"],
                                    "weight_size_ratio": i["weight_bytes_fp32"] / i["weight_bytes_int8"],
                                    "file_size_ratio": p["file_bytes"] / i["file_bytes"],
                                    "accuracy_change_points": 100 * (i["accuracy"] - p["accuracy"])},
            "goals_met": goals}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    root = RESULTS / "compression_runs"
    root.mkdir(parents=True, exist_ok=True)
    digits_plan = {"epochs": 14, "prune_start": 2, "prune_end": 6, "qat_start": 9, "freeze": 12}
    adult_plan = {"epochs": 7, "prune_start": 1, "prune_end": 3, "qat_start": 4, "freeze": 6}
    if args.quick:
        digits_plan = {"epochs": 6, "prune_start": 1, "prune_end": 2, "qat_start": 3, "freeze": 5}
        adult_plan = {"epochs": 4, "prune_start": 0, "prune_end": 1, "qat_start": 2, "freeze": 3}
    digits = DigitsDataModule(batch_size=64)
    digits.setup("fit")
    adult = AdultDataModule(batch_size=256)
    adult.setup("fit")
    started = time.perf_counter()
    result = {
        "torch_threads": 1,
        "digits_smallcnn": run_case("digits", lambda: SmallCNN(batch_norm=True), digits,
                                    digits.val_dataset.tensors[0][:64].clone(), digits_plan, root),
        "adult_tabular_mlp": run_case("adult", lambda: TabularMLP(hidden_dims=[256, 128]), adult,
                                      adult.val_dataset.tensors["x"][:256].clone(), adult_plan, root),
    }  # fmt: skip
    result["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
