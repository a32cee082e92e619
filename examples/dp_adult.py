"""Differentially private training of an unchanged LightningModule on Adult (DP-SGD via Opacus).

    python examples/dp_adult.py                              # (3, 1e-5)-DP, 5 epochs, PRV accountant
    python examples/dp_adult.py --epsilon 1 --accountant rdp
    python examples/dp_adult.py --ghost                      # fast gradient (ghost) clipping
    python examples/dp_adult.py --physical-batch 128         # virtual batches: logical 512, physical <= 128

The model and data module are plain user code; the only change is one callback. ε is logged as
`privacy/epsilon` in runs/dp_adult/*/metrics.csv; the ε curve and a JSON report are written under
runs/dp_adult/*/lightning_trust/privacy/.
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_trust.demo import AdultDataModule, TabularMLP
from lightning_trust.privacy import DifferentialPrivacy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--accountant", choices=["prv", "rdp", "gdp"], default="prv")
    parser.add_argument("--ghost", action="store_true", help="grad_sample_mode='ghost'")
    parser.add_argument("--physical-batch", type=int, default=None, help="max_physical_batch_size")
    args = parser.parse_args()

    pl.seed_everything(42)
    dp = DifferentialPrivacy(
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        accountant=args.accountant,
        grad_sample_mode="ghost" if args.ghost else "hooks",
        max_physical_batch_size=args.physical_batch,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[dp],
        logger=CSVLogger("runs/dp_adult", name=""),
    )
    datamodule = AdultDataModule(batch_size=args.batch_size)
    model = TabularMLP(lr=3e-3)
    trainer.fit(model, datamodule)
    trainer.test(model, datamodule)
    print(json.dumps({k: v for k, v in dp.report().items() if k != "epsilon_curve"}, indent=2))


if __name__ == "__main__":
    main()
