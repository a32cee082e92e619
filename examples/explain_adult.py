"""Feature importance on UCI Adult while a TabularMLP trains: integrated gradients against the mean
training row, ranked with the datamodule's real feature names (``age``, ``marital-status=...``), logged
every epoch with the drift of the ranking; bar chart and CSV at the end.

    python examples/explain_adult.py
    python examples/explain_adult.py --method shapley_value_sampling   # slower, model-agnostic
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_trust.demo import AdultDataModule, TabularMLP
from lightning_trust.explain import Attribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--method",
        default="integrated_gradients",
        choices=["integrated_gradients", "deeplift", "feature_ablation", "shapley_value_sampling"],
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--root", default="runs/explain_adult")
    args = parser.parse_args()

    pl.seed_everything(42)
    options = {"n_samples": 5} if args.method == "shapley_value_sampling" else {}
    attribution = Attribution(method=args.method, method_kwargs=options, num_samples=64, baseline="mean", top_k=15)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=args.root,
        logger=CSVLogger(args.root, name=""),
        callbacks=[attribution],
    )
    trainer.fit(TabularMLP(), AdultDataModule(batch_size=256))
    report = attribution.report()
    for item in report["top_features"]:
        print(f"{item['feature']:<45} {item['score']:.4f}")
    print("drift per epoch:", report["drift_history"])
    print("files:", report["files"], report["figures"])


if __name__ == "__main__":
    main()
