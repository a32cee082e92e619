"""Compression benchmark: dense vs Lightning's ModelPruning (same parameter budget) vs ours
(ProgressivePruning; ProgressivePruning + QuantizationAwareTraining int8), on SmallCNN/digits and
TabularMLP/Adult, in one run. CPU latency is measured single-threaded in this process, back to back.

    python benchmarks/compression.py            # a few minutes on a 2-core CPU
    python benchmarks/compression.py --quick    # fewer epochs (smoke run)

Goals (issue #7): 50% channel pruning >= 2x CPU speedup with <= 1 point accuracy loss; int8 >= 3x
faster and >= 3.5x smaller than fp32 with <= 0.5 point loss.

Transformers (issue #18; ``--transformers`` runs only these and keeps the other rows of the JSON): the
tiny BERT on the text demo and a tiny Hugging Face ViT on the digits (8x8, patch 2): dense, pruned
(whole heads + MLP width, plain fine-tuning), pruned with distillation from the dense teacher, and
pruned + int8 (QAT export) where the export succeeds. Goal: pruning >= 1.5x faster at <= 1 point.

``--torchao`` (keeps every other row): dense, pruned and pruned + int8 through torchao's ``quantize_``
(``QuantizationAwareTraining(backend="torchao")``, int8 dynamic activations and weights), with the
callback's own compiled fp32-vs-int8 measurement, and a kernel probe (one BERT-base-sized Linear, fp32
against torchao int8) that says whether this CPU has fast int8 matmuls at all. Goal: int8 >= 2x.
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
from typing import Any, Optional

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

try:  # run as a script (python benchmarks/compression.py) or as a module
    from text_models import MAX_LENGTH, TEXT_BATCH, VOCAB, TextClassifier, tiny_bert
except ImportError:
    from benchmarks.text_models import MAX_LENGTH, TEXT_BATCH, VOCAB, TextClassifier, tiny_bert

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


class ImageTransformer(pl.LightningModule):
    """A Hugging Face ViT classifier on ``(image, label)`` tuple batches, as its users write it."""

    def __init__(self, model: nn.Module, lr: float = 2e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(pixel_values=x).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TextTransformer(TextClassifier):
    """The tiny BERT classifier with a validation step (ProgressivePruning measures accuracy on it)."""

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        self.log("val_loss", nn.functional.cross_entropy(logits, batch["labels"]))


class Int8Runner(nn.Module):
    """The exported int8 program called as the float module is: its call bound to the canonical form the
    program was exported with (QuantizationAwareTraining's ``ForwardCall``)."""

    def __init__(self, program: Any, like: nn.Module) -> None:
        super().__init__()
        self.program, self.like = program, [like]  # a list: the float module is not a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from lightning_trust.compression.qat_call import ForwardCall

        return ForwardCall.bind(self.like[0], args, kwargs).invoke(self.program)


def tiny_vit() -> nn.Module:
    """A 2-layer, 64-wide, 4-head ViT on 1x8x8 digits with 2x2 patches (17 tokens)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128)  # fmt: skip
    return ViTForImageClassification(config)


def _transformer_accuracy(model: nn.Module, loader: Any) -> float:
    preds, target = collect_predictions({"m": model}, [loader], BatchContract.resolve(None, None), torch.device("cpu"))
    return float((preds["m"] == target).float().mean())


def run_transformer_case(
    name: str, make: Any, datamodule: Any, x: Any, plan: dict[str, Any], root: Path, torchao_only: bool = False
) -> dict[str, Any]:
    """Dense, pruned (plain fine-tuning), pruned + distillation and pruned + int8 of one transformer."""
    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {}
    fit_kw = {"limit_train_batches": plan.get("batches")}
    loader = datamodule.test_dataloader()

    def trainer(sub: str, callbacks: list[Any]) -> pl.Trainer:
        return pl.Trainer(max_epochs=plan["epochs"], accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                          default_root_dir=str(root / sub), callbacks=callbacks, num_sanity_val_steps=0,
                          **{k: v for k, v in fit_kw.items() if v is not None})  # fmt: skip

    def describe(model: nn.Module) -> dict[str, Any]:
        with plain_forward(model):
            macs, params = count_macs_params(model, x)
        config = model.model.config
        return {"params": params, "macs_per_sample": macs, "accuracy": _transformer_accuracy(model, loader),
                "heads": config.num_attention_heads, "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size}  # fmt: skip

    pl.seed_everything(0)
    dense = make()
    t0 = time.perf_counter()
    trainer("dense", []).fit(dense, datamodule)
    rows["dense"] = {**describe(dense.eval()), "train_s": time.perf_counter() - t0}
    runners["dense"] = dense
    variants = (("pruned", None), ("pruned_distilled", {"temperature": 2.0, "weight": 0.5}))
    for key, distill in variants[:1] if torchao_only else variants:
        pl.seed_everything(0)
        model = make()
        cb = ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=plan["prune_at"],
                                measure_latency=False, evaluate=False, distill=distill)  # fmt: skip
        t0 = time.perf_counter()
        trainer(key, [cb]).fit(model, datamodule)
        rows[key] = {**describe(model.eval()), "train_s": time.perf_counter() - t0}
        runners[key] = model
    int8_note = "not run (--torchao)" if torchao_only else _int8_row(make, datamodule, x, plan, root, trainer, rows,
                                                                     runners, name)  # fmt: skip
    torchao_note = _torchao_row(make, datamodule, plan, root, trainer, rows, runners, name)
    best = {key: float("inf") for key in runners}
    for _ in range(5):  # back to back, alternating, best median kept (the CPU is shared)
        for key, runner in runners.items():
            best[key] = min(best[key], measure_latency(runner, x, min_run_time=0.4))
    d = rows["dense"]
    for key, seconds in best.items():
        rows[key]["latency_ms_batch32"] = seconds * 1e3
    for row in rows.values():
        row["speedup_vs_dense"] = d["latency_ms_batch32"] / row["latency_ms_batch32"]
        row["macs_ratio_vs_dense"] = row["macs_per_sample"] / d["macs_per_sample"]
        row["accuracy_change_points"] = 100 * (row["accuracy"] - d["accuracy"])
    p, k = rows["pruned"], rows.get("pruned_distilled", rows["pruned"])
    goals = {"pruning_speedup_ge_1_5x": p["speedup_vs_dense"] >= 1.5,
             "pruning_accuracy_loss_le_1pt": max(p["accuracy_change_points"], k["accuracy_change_points"]) >= -1.0}  # fmt: skip
    for key in ("pruned_int8", "pruned_int8_torchao"):
        if key in rows:
            ratio = p["latency_ms_batch32"] / rows[key]["latency_ms_batch32"]
            goals[f"{key}_speedup_vs_fp32_pruned_ge_2x"] = ratio >= 2.0
    out = {"rows": rows, "int8": int8_note, "int8_torchao": torchao_note, "goals_met": goals, "plan": plan}
    if "pruned_distilled" in rows:
        out["distillation_recovers_points"] = k["accuracy_change_points"] - p["accuracy_change_points"]
    return out


def _prune_then_qat(make: Any, datamodule: Any, plan: dict[str, Any], trainer: Any, key: str, qat: Any,
                    start: Optional[dict[str, Any]] = None) -> Any:  # fmt: skip
    """One-shot pruning then ``qat`` in one fit; the int8 program as a user loads it (compiled). ``start``:
    the trained dense weights to begin from, and the pruning recipe (``distill``) of the recovery fit."""
    pl.seed_everything(0)
    model = make()
    if start is not None:
        model.load_state_dict(start["state"])
    pruning = ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=plan["prune_at"],
                                 measure_latency=False, evaluate=False,
                                 distill=None if start is None else start.get("distill"))  # fmt: skip
    trainer(key, [pruning, qat]).fit(model, datamodule)
    with plain_forward(model):
        like = copy.deepcopy(model).eval()
    return Int8Runner(load_int8_model(qat.export_file, compile=True), like)


def _torchao_row(make: Any, datamodule: Any, plan: dict[str, Any], root: Path, trainer: Any,
                 rows: dict[str, Any], runners: dict[str, Any], name: str,
                 start: Optional[dict[str, Any]] = None) -> str:  # fmt: skip
    """Prune, then QAT through torchao's quantize_ (int8 dynamic activations and weights) in one fit."""
    qat = QuantizationAwareTraining(start_epoch=plan["qat_at"], backend="torchao", torchao_scheme="int8",
                                    export_path=str(root / f"{name}_int8_torchao.pt2"), latency_batch_size=32)  # fmt: skip
    try:
        int8 = _prune_then_qat(make, datamodule, plan, trainer, "pruned_int8_torchao", qat, start)
    except Exception as err:  # the row is left out, and the reason recorded
        return f"left out: prune then torchao QAT failed: {type(err).__name__}: {str(err)[:300]}"
    q = qat.report()
    rows["pruned_int8_torchao"] = {
        "params": rows["pruned"]["params"], "macs_per_sample": rows["pruned"]["macs_per_sample"],
        "accuracy": _transformer_accuracy(int8, datamodule.test_dataloader()),
        "weight_bytes_int8": q.get("size_int8_bytes"), "weight_bytes_fp32": q.get("size_fp32_bytes"),
        "file_bytes": os.path.getsize(qat.export_file), "agreement_with_fake_quant": q.get("agreement"),
        "callback_speedup_compiled_fp32_vs_int8": q.get("speedup"), "int8_pays_off": q.get("int8_pays_off"),
        "cpu_capability": q.get("cpu_capability"),
    }  # fmt: skip
    runners["pruned_int8_torchao"] = int8
    return "measured: ProgressivePruning then QuantizationAwareTraining(backend='torchao') in one fit, from the .pt2"


def int8_kernel_probe() -> dict[str, Any]:
    """One BERT-base-sized Linear (768 -> 768, 32 x 32 tokens) on one thread: fp32 against torchao's
    int8 dynamic activations and weights, eager and compiled: whether this CPU has fast int8 matmuls."""
    from torchao.quantization import quantize_

    from lightning_trust.compression.export import compile_int8
    from lightning_trust.compression.qat_torchao import cpu_capability, torchao_configs

    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(768, 768)).eval()
    int8 = copy.deepcopy(fp32)
    quantize_(int8, torchao_configs("int8")[0])
    quantize_(int8, torchao_configs("int8")[1])
    x = torch.randn(1024, 768)
    runners = {"fp32_eager": fp32, "int8_eager": int8, "fp32_compiled": compile_int8(fp32),
               "int8_compiled": compile_int8(int8)}  # fmt: skip
    best = {key: float("inf") for key in runners}
    for _ in range(3):
        for key, runner in runners.items():
            best[key] = min(best[key], measure_latency(runner, x, min_run_time=0.3) * 1e3)
    return {"cpu_capability": cpu_capability(), "shape": "1024x768 @ 768x768", "latency_ms": best,
            "int8_speedup_eager": best["fp32_eager"] / best["int8_eager"],
            "int8_speedup_compiled": best["fp32_compiled"] / best["int8_compiled"]}  # fmt: skip


def _int8_row(make: Any, datamodule: Any, x: Any, plan: dict[str, Any], root: Path, trainer: Any,
              rows: dict[str, Any], runners: dict[str, Any], name: str,
              start: Optional[dict[str, Any]] = None) -> str:  # fmt: skip
    """Prune, then QAT and the int8 export, chained in one fit; the row is left out (and why said) if it fails."""
    qat = QuantizationAwareTraining(start_epoch=plan["qat_at"], export_path=str(root / f"{name}_int8.pt2"),
                                    measure_latency=False)  # fmt: skip
    try:
        int8 = _prune_then_qat(make, datamodule, plan, trainer, "pruned_int8", qat, start)
    except Exception as err:  # the row is left out, and the reason recorded
        return f"left out: prune then QAT failed: {type(err).__name__}: {str(err)[:300]}"
    q = qat.report()
    rows["pruned_int8"] = {"params": rows["pruned"]["params"], "macs_per_sample": rows["pruned"]["macs_per_sample"],
                           "accuracy": _transformer_accuracy(int8, datamodule.test_dataloader()),
                           "weight_bytes_int8": q.get("size_int8_bytes"), "weight_bytes_fp32": q.get("size_fp32_bytes"),
                           "file_bytes": os.path.getsize(qat.export_file)}  # fmt: skip
    runners["pruned_int8"] = int8
    return "measured: ProgressivePruning then QuantizationAwareTraining in one fit, int8 loaded from the .pt2"


#: The ViT recipe (issue #18 goal: >= 1.5x at <= 1 point): train dense, prune the trained model once (whole heads
#: 4 -> 2, so the residual stream 64 -> 32, and MLP width 128 -> 64: ``pruning_ratio=0.5, schedule="one_shot"``)
#: and recover for ``recovery_epochs`` extra epochs, distilling from the dense model (T = 4, weight 0.9) and, as
#: the plain row, without. Fixed on the validation split with seed 100 (there pruning at epoch 12 of 30 lost 2.6
#: points, with distillation from that epoch-12 teacher over 40 epochs 3.7, and this recipe, in one 45-epoch fit,
#: 0.0); reported on the test split with seeds 0, 1, 2, never tuned on it.
VIT_DISTILL = {"temperature": 4.0, "weight": 0.9}


def _mean_std(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "per_seed": values}


def _agreement(a: nn.Module, b: nn.Module, loader: Any) -> float:
    preds, _ = collect_predictions({"a": a, "b": b}, [loader], BatchContract.resolve(None, None), torch.device("cpu"))
    return float((preds["a"] == preds["b"]).float().mean())


def run_vit_seeds(
    datamodule: Any, x: Any, plan: dict[str, Any], root: Path, torchao_only: bool = False
) -> dict[str, Any]:
    """The ViT recipe over ``plan["seeds"]``: per seed dense (``dense_epochs``), then from its trained weights
    ``recovery_epochs`` of pruned + plain fine-tuning, pruned + distillation, and dense fine-tuning without pruning
    (the same extra epochs: do they alone move the dense accuracy?); accuracy on the test split as mean, std
    (n - 1), min, max and per seed, changes paired by seed. The int8 rows (prune, distill and QAT in the recovery
    fit) and the latency (batch 32, one thread) are measured on the first seed's models."""
    make = lambda: ImageTransformer(tiny_vit())  # noqa: E731
    loader = datamodule.test_dataloader()
    seeds = list(plan["seeds"])

    def trainer(sub: str, callbacks: list[Any], epochs: Optional[int] = None) -> pl.Trainer:
        return pl.Trainer(max_epochs=epochs or plan["recovery_epochs"], accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                          default_root_dir=str(root / sub), callbacks=callbacks, num_sanity_val_steps=0)  # fmt: skip

    variants: dict[str, Any] = {"pruned": None, "pruned_distilled": VIT_DISTILL, "dense_finetuned": "dense"}
    if torchao_only:
        variants = {"pruned_distilled": VIT_DISTILL}
    acc: dict[str, list[float]] = {k: [] for k in ("dense", *variants)}
    agree: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, Any] = {}
    seconds: dict[str, list[float]] = {k: [] for k in acc}
    for seed in seeds:
        pl.seed_everything(seed)
        dense = make()
        t0 = time.perf_counter()
        trainer(f"vit_dense_{seed}", [], plan["dense_epochs"]).fit(dense, datamodule)
        seconds["dense"].append(time.perf_counter() - t0)
        dense.eval()
        acc["dense"].append(_transformer_accuracy(dense, loader))
        models = {"dense": dense}
        for key, distill in variants.items():
            pl.seed_everything(seed)
            model = make()
            model.load_state_dict(dense.state_dict())
            callbacks = [] if distill == "dense" else [
                ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=0, measure_latency=False,
                                   evaluate=False, distill=distill)]  # fmt: skip
            t0 = time.perf_counter()
            trainer(f"vit_{key}_{seed}", callbacks).fit(model, datamodule)
            seconds[key].append(time.perf_counter() - t0)
            model.eval()
            acc[key].append(_transformer_accuracy(model, loader))
            agree[key].append(_agreement(model, dense, loader))
            models[key] = model
        if not first:
            first = models
    rows: dict[str, dict[str, Any]] = {}
    runners: dict[str, Any] = {k: m for k, m in first.items() if k != "dense_finetuned"}
    for key, model in first.items():
        with plain_forward(model):
            macs, params = count_macs_params(model, x)
        config = model.model.config
        rows[key] = {"params": params, "macs_per_sample": macs, "heads": config.num_attention_heads,
                     "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                     "epochs": plan["dense_epochs"] + (0 if key == "dense" else plan["recovery_epochs"]),
                     "accuracy": _mean_std(acc[key]),
                     "train_s_mean": sum(seconds[key]) / len(seconds[key])}  # fmt: skip
        if key != "dense":
            rows[key]["accuracy_change_points"] = _mean_std([100 * (a - d) for a, d in zip(acc[key], acc["dense"])])
            rows[key]["agreement_with_dense"] = _mean_std(agree[key])
    start = {"state": first["dense"].state_dict(), "distill": VIT_DISTILL}
    int8_plan = {"prune_at": 0, "qat_at": plan["qat_at"]}
    int8_note = "not run (--torchao)" if torchao_only else _int8_row(make, datamodule, x, int8_plan, root, trainer,
                                                                     rows, runners, "vit", start)  # fmt: skip
    torchao_note = _torchao_row(make, datamodule, int8_plan, root, trainer, rows, runners, "vit", start)
    for key in ("pruned_int8", "pruned_int8_torchao"):
        if key in rows:  # one seed (the first): the change against that seed's dense model
            rows[key]["seeds"] = seeds[:1]
            rows[key]["accuracy_change_points"] = 100 * (rows[key]["accuracy"] - acc["dense"][0])
    best = {key: float("inf") for key in runners}
    for _ in range(plan["latency_rounds"]):  # back to back, alternating, best median kept (the CPU is shared)
        for key, runner in runners.items():
            best[key] = min(best[key], measure_latency(runner, x, min_run_time=0.2))
    d = rows["dense"]
    for key, s in best.items():
        rows[key]["latency_ms_batch32"] = s * 1e3
        rows[key]["speedup_vs_dense"] = best["dense"] / s
    for row in rows.values():
        row["macs_ratio_vs_dense"] = row["macs_per_sample"] / d["macs_per_sample"]
    k = rows["pruned_distilled"]
    goals: dict[str, bool] = {}
    for key in ("pruned", "pruned_distilled"):  # both variants of the one recipe, judged alike
        if key in rows:
            change = rows[key]["accuracy_change_points"]
            goals[f"{key}_speedup_ge_1_5x"] = rows[key]["speedup_vs_dense"] >= 1.5
            goals[f"{key}_accuracy_loss_le_1pt_mean_over_seeds"] = change["mean"] >= -1.0
            goals[f"{key}_accuracy_loss_le_1pt_every_seed"] = change["min"] >= -1.0
    for key in ("pruned_int8", "pruned_int8_torchao"):
        if key in rows:
            goals[f"{key}_speedup_vs_fp32_pruned_ge_2x"] = (
                k["latency_ms_batch32"] / rows[key]["latency_ms_batch32"] >= 2.0
            )
    out = {"recipe": "dense for dense_epochs; then from the trained weights ProgressivePruning(pruning_ratio=0.5, "
                      "schedule='one_shot', start_epoch=0, distill={'temperature': 4.0, 'weight': 0.9}) for "
                      "recovery_epochs (pruned: the same without distill; dense_finetuned: the same epochs, no pruning)",
           "rows": rows, "int8": int8_note, "int8_torchao": torchao_note, "goals_met": goals, "plan": plan,
           "accuracy_split": f"test ({len(loader.dataset)} digits; one digit = {100 / len(loader.dataset):.2f} points)"}  # fmt: skip
    if "pruned" in rows:
        out["distillation_recovers_points"] = _mean_std(
            [100 * (a - b) for a, b in zip(acc["pruned_distilled"], acc["pruned"])]
        )
    return out


def vit_plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"seeds": [0, 1], "dense_epochs": 3, "recovery_epochs": 3, "qat_at": 2, "latency_rounds": 3}
    return {"seeds": [0, 1, 2], "dense_epochs": 30, "recovery_epochs": 15, "qat_at": 11, "latency_rounds": 15}


def transformer_cases(quick: bool, root: Path, torchao_only: bool = False) -> dict[str, Any]:
    """The tiny BERT on the text demo and the tiny ViT on the digits, at batch 32 and one thread."""
    from lightning_trust.demo import AdultTextDataModule

    text = AdultTextDataModule(batch_size=TEXT_BATCH, vocab_size=VOCAB, max_length=MAX_LENGTH)
    text.setup("fit")
    batch = next(iter(text.test_dataloader()))
    text_x = {"input_ids": batch["input_ids"][:32], "attention_mask": batch["attention_mask"][:32]}
    digits = DigitsDataModule(batch_size=32)
    digits.setup("fit")
    text_plan = {
        "epochs": 3 if quick else 5,
        "prune_at": 1 if quick else 2,
        "qat_at": 2 if quick else 4,
        "batches": 60 if quick else 200,
    }
    return {
        "text_tiny_bert": run_transformer_case("bert", lambda: TextTransformer(tiny_bert()), text, text_x, text_plan, root,
                                               torchao_only),
        "digits_tiny_vit": run_vit_seeds(digits, digits.val_dataset.tensors[0][:32].clone(), vit_plan(quick), root,
                                         torchao_only),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--transformers", action="store_true", help="only the transformer rows (others kept)")
    parser.add_argument("--torchao", action="store_true", help="only dense, pruned, torchao int8 rows (others kept)")
    parser.add_argument(
        "--vit", action="store_true", help="only the tiny ViT rows (transformers.digits_tiny_vit; others kept)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    root = RESULTS / "compression_runs"
    root.mkdir(parents=True, exist_ok=True)
    if args.torchao:
        path = RESULTS / "compression.json"
        result = json.loads(path.read_text()) if path.exists() else {"torch_threads": 1}
        started = time.perf_counter()
        result["transformers_torchao"] = {"int8_kernel_probe": int8_kernel_probe(),
                                          **transformer_cases(args.quick, root, torchao_only=True)}  # fmt: skip
        result["transformers_torchao"]["wall_s"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["transformers_torchao"], indent=2))
        return
    if args.vit:
        path = RESULTS / "compression.json"
        result = json.loads(path.read_text()) if path.exists() else {"torch_threads": 1}
        digits = DigitsDataModule(batch_size=32)
        digits.setup("fit")
        assert digits.val_dataset is not None
        started = time.perf_counter()
        vit = run_vit_seeds(digits, digits.val_dataset.tensors[0][:32].clone(), vit_plan(args.quick), root)
        vit["wall_s"] = time.perf_counter() - started
        prior: Any = result.get("transformers") or {}  # the BERT rows are kept
        result["transformers"] = {**prior, "digits_tiny_vit": vit}
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(vit, indent=2))
        return
    if args.transformers:
        path = RESULTS / "compression.json"
        result = json.loads(path.read_text()) if path.exists() else {"torch_threads": 1}
        started = time.perf_counter()
        result["transformers"] = transformer_cases(args.quick, root)
        result["transformers"]["wall_s"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["transformers"], indent=2))
        return
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
    result["transformers"] = transformer_cases(args.quick, root)
    result["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
