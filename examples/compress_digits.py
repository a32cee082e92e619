"""Prune SmallCNN progressively, train it quantization-aware, export int8, and load the results
outside Lightning: the pruned checkpoint (``load_pruned_checkpoint``) and the int8 program
(``load_int8_model``).

    python examples/compress_digits.py
"""

import json

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_trust.compression import (
    ProgressivePruning,
    QuantizationAwareTraining,
    load_int8_model,
    load_pruned_checkpoint,
)
from lightning_trust.demo import DigitsDataModule, SmallCNN


def main() -> None:
    pl.seed_everything(42)
    datamodule = DigitsDataModule(batch_size=64)
    pruning = ProgressivePruning(pruning_ratio=0.5, schedule="cubic", start_epoch=2, end_epoch=5)
    qat = QuantizationAwareTraining(start_epoch=7, freeze_observers_epoch=9, freeze_bn_epoch=9,
                                    export_path="runs/compress_digits/digits_int8.pt2")  # fmt: skip
    checkpoint = ModelCheckpoint(save_last=True)
    trainer = pl.Trainer(max_epochs=11, accelerator="cpu", default_root_dir="runs/compress_digits",
                         callbacks=[pruning, qat, checkpoint])  # fmt: skip
    trainer.fit(SmallCNN(batch_norm=True), datamodule)
    print(json.dumps({"compression": {k: v for k, v in pruning.report().items() if k != "steps"},
                      "quantization": qat.report()}, indent=2))  # fmt: skip

    # outside Lightning: the pruned float model from the checkpoint ...
    model = load_pruned_checkpoint(SmallCNN, checkpoint.last_model_path).eval()
    # ... and the int8 program (any batch size; `compile=True` runs the real int8 kernels)
    int8 = load_int8_model(qat.export_file)
    images, labels = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        print("float pruned accuracy:", (model(images).argmax(-1) == labels).float().mean().item())
        print("int8 accuracy:", (int8(images).argmax(-1) == labels).float().mean().item())


if __name__ == "__main__":
    main()
