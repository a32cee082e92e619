"""Train the demo TabularMLP on the bundled Adult data with a plain Lightning Trainer.

python examples/quickstart.py
"""

import lightning.pytorch as pl

from lightning_trust.demo import AdultDataModule, TabularMLP


def main() -> None:
    pl.seed_everything(42)
    datamodule = AdultDataModule(batch_size=256)
    model = TabularMLP(input_dim=datamodule.num_features)
    trainer = pl.Trainer(max_epochs=5, accelerator="cpu", default_root_dir="runs/quickstart")
    trainer.fit(model, datamodule)
    trainer.test(model, datamodule)


if __name__ == "__main__":
    main()
