"""Domain filter over map-style datasets, HoldOutDomain in a run, and the leave-one-domain-out helper."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_trust.core.batch import BatchContract
from lightning_trust.evaluation import DomainSubset, HoldOutDomain
from lightning_trust.evaluation.lodo import leave_one_domain_out


def test_domain_subset_on_tuple_and_dict_datasets(adult):
    data = TensorDataset(torch.randn(10, 2), torch.zeros(10), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))
    contract = BatchContract(columns={"site": 2})
    assert DomainSubset(data, "site", keep=[0], contract=contract).indices == [0, 3, 6, 9]
    assert DomainSubset(data, "site", exclude=[0, 1], contract=contract).indices == [2, 5, 8]
    asia = DomainSubset(adult.val_dataset, "native_region", keep=[2])
    assert len(asia) == int((adult.val_dataset.tensors["native_region"] == 2).sum())
    assert all(int(asia[i]["native_region"]) == 2 for i in range(len(asia)))
    with pytest.raises(ValueError, match="left no samples; the column has values"):
        DomainSubset(data, "site", keep=[9], contract=contract)
    with pytest.raises(ValueError, match="exactly one"):
        DomainSubset(data, "site", contract=contract)


def test_hold_out_domain_filters_the_training_loaders(adult, tmp_path):
    import lightning.pytorch as pl

    from lightning_trust.demo import TabularMLP
    from tests.support import trainer

    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch["native_region"])

    hold = HoldOutDomain("native_region", held_out=["Asia", "Europe"])
    trainer(tmp_path, [hold, Spy()], max_epochs=1, limit_train_batches=20, num_sanity_val_steps=2).fit(
        TabularMLP(), adult
    )
    regions = torch.cat(seen)
    assert not bool(((regions == 2) | (regions == 3)).any())
    train_regions = adult.train_dataset.tensors["native_region"]
    assert hold.kept_sizes["train"] == int(((train_regions != 2) & (train_regions != 3)).sum())
    assert "train_dataloader" not in vars(adult)  # the datamodule's own method is back
    with pytest.raises(ValueError, match="'Mars' is not a value of 'native_region'"):
        trainer(tmp_path, [HoldOutDomain("native_region", held_out=["Mars"])], max_epochs=1).fit(TabularMLP(), adult)


@pytest.mark.slow
def test_leave_one_domain_out_tabulates_one_run_per_domain(tmp_path):
    args = [
        "--config",
        "configs/adult_domains.yaml",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=8",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    result = leave_one_domain_out(args, "native_region", domains=["Asia", "Europe"], out_dir=tmp_path)
    assert [r["held_out"] for r in result["runs"]] == ["Asia", "Europe"]
    for run in result["runs"]:
        assert 0.5 < run["held_out_accuracy"] <= 1.0 and run["held_out_samples"] > 100
    assert result["average"]["held_out"] == pytest.approx(sum(r["held_out_accuracy"] for r in result["runs"]) / 2)
    table = Path(result["table"]["markdown"]).read_text()
    assert "| Algorithm | Asia | Europe | Avg |" in table
    assert json.loads(Path(result["table"]["json"]).read_text())["metric"] == "accuracy"
