"""Declared capabilities, the client-selection policy, and Hugging Face style keyword batches."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_trust.core import Capability
from lightning_trust.federated import FederatedSimulation, FederatedStrategy
from lightning_trust.federated.simulation import PER_SAMPLE_DP_REASON
from tests.support import AdultSubset, trainer


def test_declared_capabilities_and_refusals():
    plain, prox = FederatedSimulation(num_clients=2), FederatedSimulation(num_clients=2, proximal_mu=0.1)
    assert plain.capabilities == {Capability.FEDERATED_ROUNDS, Capability.REPLACES_TRAIN_LOADER}
    assert prox.capabilities == plain.capabilities | {Capability.EDITS_GRADIENTS}
    assert plain.refuses == {Capability.PER_SAMPLE_GRADIENTS: PER_SAMPLE_DP_REASON}
    assert "both choose the training batches" in PER_SAMPLE_DP_REASON and "client_dp=ClientDP" in PER_SAMPLE_DP_REASON
    state = FederatedStrategy(local_steps=2, name="federated_silos").state_callback
    assert state.capabilities == {Capability.FEDERATED_ROUNDS} and state.report_name == "federated_silos"
    assert FederatedSimulation(num_clients=2, name="fed_a").report_name == "fed_a"


class RoundRobin(FederatedSimulation):
    def select_clients(self, round_index, num_clients, generator):
        k = self.expected_clients_per_round
        return [(round_index * k + i) % num_clients for i in range(k)]


def test_an_overridden_client_selection_is_used(adult):
    cb = RoundRobin(num_clients=4, clients_per_round=2, local_steps=1, seed=0)
    trainer(max_epochs=3, callbacks=[cb], limit_val_batches=0).fit(
        _tiny_adult_module(), AdultSubset(adult, 256, 64, batch_size=64, pick="random")
    )
    assert [r["clients"] for r in cb.history] == [[0, 1], [2, 3], [0, 1]]


class Twice(FederatedSimulation):
    def select_clients(self, round_index, num_clients, generator):
        return [0, 0]


def test_a_bad_client_selection_is_refused(adult):
    with pytest.raises(ValueError, match="distinct client ids"):
        trainer(max_epochs=1, callbacks=[Twice(num_clients=2, local_steps=1)], limit_val_batches=0).fit(
            _tiny_adult_module(), AdultSubset(adult, 128, 64, batch_size=64, pick="random")
        )


def _tiny_adult_module():
    from lightning_trust.demo import TabularMLP

    return TabularMLP()


class Tokens(Dataset):
    """Dict samples of model keyword inputs: ``{"input_ids", "labels"}`` (no ``x`` key)."""

    def __init__(self, n=48, length=6, vocab=20):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class TokenClassifier(pl.LightningModule):
    def __init__(self, vocab=20):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids).mean(1))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(input_ids=batch["input_ids"]), batch["labels"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(Tokens(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_simulation_counts_samples_of_keyword_batches():
    cb = FederatedSimulation(num_clients=3, local_steps=2, partition="iid", seed=0)  # 16 samples each
    trainer(max_epochs=2, callbacks=[cb], limit_val_batches=0).fit(TokenClassifier())
    assert cb.round == 2 and sum(cb.partition_info["sizes"]) == 48
    assert len(cb.partition_info["label_histograms"]) == 3  # labels read from the dict samples
    for record in cb.history:
        assert set(record["client_samples"].values()) == {8}  # 2 steps x 4 samples each


def test_strategy_counts_samples_of_keyword_batches(tmp_path):
    import torch.distributed as dist

    strategy = FederatedStrategy(local_steps=2)
    try:
        trainer(tmp_path, strategy=strategy, max_epochs=1, limit_train_batches=4, limit_val_batches=0).fit(
            TokenClassifier()
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert strategy.round == 2 and [r["client_samples"] for r in strategy.history] == [[8], [8]]
