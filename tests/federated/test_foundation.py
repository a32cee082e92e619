"""Federated fine-tuning of foundation models: adapter-only payloads on a PEFT LoRA BERT (what travels,
what the server holds, bytes), dict batches the contract cannot name, round sizes refused at
construction, and the text demo partitioned by ``native_region``."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_trust.core.tensors import tensor_bytes
from lightning_trust.federated import ByKey, ClientDP, FederatedSimulation, FederatedStrategy, Krum, MultiKrum
from lightning_trust.federated.adaptive import AdaptiveClipping
from lightning_trust.federated.payload import (
    base_fingerprint,
    check_fingerprint,
    frozen_names,
    load_payload,
    payload_keys,
    trainable_names,
)
from tests.federated.helpers import check_declared_keys
from tests.foundation.models import build
from tests.support import trainer


class Recording(FederatedSimulation):
    """Keeps what crossed the wire: every client update and every aggregated payload."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sent_up, self.aggregated = [], []
        aggregate = self.server.aggregate

        def recording(global_state, updates, param_keys, expected=None):
            self.sent_up.append([dict(u.state) for u in updates])
            new, metrics = aggregate(global_state, updates, param_keys, expected)
            self.aggregated.append(dict(new))
            return new, metrics

        self.server.aggregate = recording


def _fit_lora(tmp_path, payload, rounds=2):
    module, dm = build("bert_lora")
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    sim = Recording(num_clients=2, local_steps=2, seed=0, payload=payload)
    torch.manual_seed(0)  # dropout draws the same in both payload modes
    t = trainer(tmp_path, callbacks=[sim], max_epochs=rounds, limit_val_batches=1)
    t.fit(module, dm)
    return module, sim, initial, t


@pytest.mark.slow
def test_adapter_only_federation_sends_and_holds_only_the_trainable_tensors(tmp_path):
    module, sim, initial, t = _fit_lora(tmp_path, "trainable")
    frozen, trainable = set(frozen_names(module)), set(trainable_names(module))
    assert len(frozen) > 40 and 0 < len(trainable) < len(frozen)  # LoRA matrices and the classifier head train
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    for round_updates in sim.sent_up:
        assert len(round_updates) == 2
        for state in round_updates:
            assert set(state) == set(payload_keys(module, "trainable")) and not set(state) & frozen
    for aggregated in sim.aggregated:
        assert not set(aggregated) & frozen  # the server never receives nor returns a frozen tensor
    assert not set(sim._global) & frozen  # ... nor holds one (its checkpointed state neither)
    assert not set(sim.state_dict()["global"]) & frozen
    now = module.state_dict()
    for name in frozen:  # the frozen base bit-identical after the rounds
        assert torch.equal(now[name], initial[name]), name
    assert any(not torch.equal(now[n], initial[n]) for n in trainable)
    # bytes measured from the payloads: each of the 2 clients receives and sends one payload per round
    sizes = {k: v for k, v in module.state_dict().items() if k in sim._global}
    payload = tensor_bytes(sizes)
    report = sim.report()
    assert report["payload"] == "trainable" and report["payload_bytes"] == payload
    assert report["frozen_bytes"] == tensor_bytes([p for n, p in module.named_parameters() if n in frozen])
    for record in report["per_round"]:
        assert record["bytes_up"] == record["bytes_down"] == 2 * payload
    assert report["bytes_up_per_round"] == 2 * payload
    assert float(t.callback_metrics["federated/bytes_up"]) == 2 * payload
    check_declared_keys(sim, report, t.callback_metrics, optional=["epsilon", "delta", "client_dp"])


@pytest.mark.slow
def test_full_payload_moves_the_whole_model_and_trains_identically(tmp_path):
    lora, lora_sim, _, _ = _fit_lora(tmp_path / "a", "trainable")
    full, full_sim, _, _ = _fit_lora(tmp_path / "b", "full")
    frozen = set(frozen_names(full))
    assert all(frozen <= set(state) for state in full_sim.sent_up[0])  # the base travels too
    trainable_state, full_state = lora.state_dict(), full.state_dict()
    for k in trainable_state:  # the frozen base does not change, so federating it changes nothing
        assert torch.equal(trainable_state[k], full_state[k]), k
    lora_bytes = lora_sim.report()["bytes_up_per_round"]
    full_bytes = full_sim.report()["bytes_up_per_round"]
    assert full_bytes == 2 * tensor_bytes(
        {k: v for k, v in full.state_dict().items() if k in payload_keys(full, "full")}
    )
    assert lora_bytes < full_bytes / 5, (lora_bytes, full_bytes)


def test_payload_keys_travel_a_tied_tensor_once_and_refuse_a_missing_trainable():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight
            self.norm = nn.BatchNorm1d(3)

    model = Tied()
    assert "head.weight" in model.state_dict() and "head.weight" not in payload_keys(model, "full")
    assert payload_keys(model, "full") == [
        "embed.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
    ]  # fmt: skip
    model.norm.requires_grad_(False)
    assert payload_keys(model, "trainable") == [
        "embed.weight", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
    ]  # fmt: skip  # buffers travel; frozen parameters do not
    with pytest.raises(ValueError, match="lack the trainable parameters .*embed.weight"):
        load_payload(model, {"norm.running_mean": torch.zeros(3)}, required=trainable_names(model))
    with pytest.raises(KeyError, match="lacks"):
        load_payload(model, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="payload"):
        FederatedSimulation(num_clients=2, payload="adapters")


def test_a_changed_frozen_base_is_refused_naming_the_fix():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3).requires_grad_(False), nn.Linear(3, 3).requires_grad_(False)
    assert base_fingerprint(a) != base_fingerprint(b) and base_fingerprint(nn.Linear(2, 2)) == ""
    check_fingerprint(a, base_fingerprint(a))
    with pytest.raises(ValueError, match="payload='full'"):
        check_fingerprint(b, base_fingerprint(a))


class EditsItsBase(pl.LightningModule):
    """A user module whose 'frozen' layer is edited in place (an EMA kept as a frozen parameter)."""

    def __init__(self):
        super().__init__()
        self.base, self.head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.base.weight.mul_(0.99)
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.base(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        return DataLoader(data, batch_size=4)


def test_an_edited_frozen_parameter_is_refused_after_the_first_round():
    with pytest.raises(RuntimeError, match="payload='full'"):
        trainer(max_epochs=2, callbacks=[FederatedSimulation(num_clients=2, local_steps=1)]).fit(EditsItsBase())
    full = FederatedSimulation(num_clients=2, local_steps=1, payload="full")
    trainer(max_epochs=2, callbacks=[full]).fit(EditsItsBase())
    assert full.round == 2


# dict batches the contract cannot name ---------------------------------------------------------------
class Records(Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.tokens, self.label = torch.randint(0, 10, (n, 5), generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        return {"tokens": self.tokens[i], "label": self.label[i]}


class WholeBatchModule(pl.LightningModule):
    """``forward(batch)`` on a dict batch without an ``x`` key: no input the contract can name."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, batch):
        return self.head(self.embed(batch["tokens"]).mean(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(Records(), batch_size=4)


def test_simulation_and_strategy_count_samples_of_any_dict_batch(tmp_path):
    sim = FederatedSimulation(num_clients=2, local_steps=2, seed=0)
    trainer(max_epochs=2, callbacks=[sim]).fit(WholeBatchModule())
    assert sim.round == 2 and all(set(r["client_samples"].values()) == {8} for r in sim.history)
    import torch.distributed as dist

    strategy = FederatedStrategy(local_steps=2)
    try:
        trainer(tmp_path, strategy=strategy, max_epochs=1, limit_train_batches=4).fit(WholeBatchModule())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert [r["client_samples"] for r in strategy.history] == [[8], [8]]  # 2 steps x 4 samples, not 2 batches


# round sizes refused at construction ------------------------------------------------------------------
def test_krum_and_clients_per_round_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"Krum\(f=1\) needs at least 5 .* num_clients gives 4; raise `num_clients`"):
        FederatedSimulation(num_clients=4, aggregator=Krum(f=1))
    with pytest.raises(ValueError, match="clients_per_round gives 4; raise `clients_per_round` to 7"):
        FederatedSimulation(num_clients=20, clients_per_round=0.2, aggregator=MultiKrum(f=2))
    FederatedSimulation(num_clients=20, clients_per_round=5, aggregator=Krum(f=1))
    with pytest.raises(ValueError, match="exceeds `num_clients` \\(3\\); set `clients_per_round` to at most 3"):
        FederatedSimulation(num_clients=3, clients_per_round=4)
    with pytest.raises(ValueError, match="count_stddev"):  # adaptive clipping's count noise vs 4 clients per round
        FederatedSimulation(num_clients=8, clients_per_round=4, client_dp=ClientDP(adaptive=AdaptiveClipping()))
    pytest.importorskip("flwr")
    from lightning_trust.federated.flower import flower_strategy

    with pytest.raises(ValueError, match="min_train_nodes gives 2; raise `min_train_nodes` to 5"):
        flower_strategy("krum")
    flower_strategy("krum", min_train_nodes=5, min_available_nodes=5)


def test_by_key_clients_are_checked_against_the_round_size_before_training(adult):
    from tests.support import AdultSubset

    cb = FederatedSimulation(num_clients=None, clients_per_round=10, partition="by_key(native_region)")
    counter = []

    class Steps(pl.Callback):
        def on_before_optimizer_step(self, *args):
            counter.append(1)

    from lightning_trust.demo import TabularMLP

    with pytest.raises(ValueError, match="exceeds the 5 clients; set `clients_per_round` to at most 5"):
        trainer(max_epochs=1, callbacks=[cb, Steps()]).fit(TabularMLP(), AdultSubset(adult, 2048, 64, pick="random"))
    assert not counter
    krum = FederatedSimulation(num_clients=None, partition="by_key(native_region)", aggregator=Krum(f=2))
    with pytest.raises(ValueError, match=r"Krum\(f=2\) needs at least 7 .* num_clients gives 5"):
        trainer(max_epochs=1, callbacks=[krum, Steps()]).fit(TabularMLP(), AdultSubset(adult, 2048, 64, pick="random"))
    assert not counter


# the text demo, partitioned by native_region ------------------------------------------------------------
@pytest.mark.slow
def test_text_demo_federated_by_native_region_with_a_lora_transformer(tmp_path):
    from lightning_trust.demo.foundation import TinyTextTransformer
    from lightning_trust.demo.text import AdultTextDataModule

    dm = AdultTextDataModule(batch_size=32, vocab_size=1024)
    model = TinyTextTransformer(vocab_size=1024, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                lora_rank=2)  # fmt: skip
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    sim = FederatedSimulation(num_clients=None, partition="by_key(native_region)", local_steps=2, seed=0)
    trainer(tmp_path, callbacks=[sim], max_epochs=1, limit_val_batches=2).fit(model, dm)
    regions = dm.train_dataset.tensors["native_region"]
    names = dm.categories["native_region"]
    assert sim.num_clients == len(names) == 5
    assert sim.partition_info["sizes"] == [int((regions == v).sum()) for v in range(5)]
    assert sim.partition_info["names"] == [f"native_region={v}" for v in range(5)]
    record = sim.history[0]
    assert record["clients"] == [0, 1, 2, 3, 4] and record["bytes_up"] == 5 * sim.report()["payload_bytes"]
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert sim.report()["payload_bytes"] * 10 < sim.report()["frozen_bytes"]
    by_hand = ByKey("native_region").split(dm.train_dataset, None, contract=sim._contract)
    assert [len(p) for p in by_hand] == sim.partition_info["sizes"]


class Unfreezes(pl.Callback):
    """BackboneFinetuning-style: the base trains from the second epoch (round) on."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.base.requires_grad_(True)


class FrozenBase(EditsItsBase):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.base(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_layer_unfrozen_by_a_callback_joins_the_payload_from_its_round():
    model = FrozenBase()
    initial = model.base.weight.detach().clone()
    sim = Recording(num_clients=2, local_steps=1)
    trainer(max_epochs=2, callbacks=[sim, Unfreezes()]).fit(model)  # the simulation's hooks run first
    assert [("base.weight" in s) for s in sim.sent_up[0]] == [False, False]
    assert [("base.weight" in s) for s in sim.sent_up[1]] == [True, True]
    assert "base.weight" in sim.aggregated[1] and not torch.equal(model.base.weight.detach(), initial)
    assert sim.history[1]["bytes_up"] > sim.history[0]["bytes_up"]
