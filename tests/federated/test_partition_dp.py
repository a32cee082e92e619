import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from lightning_trust.core.batch import BatchContract
from lightning_trust.federated import (
    IID,
    ByKey,
    ClientDP,
    ClientUpdate,
    Dirichlet,
    Server,
    partition_summary,
    resolve_partition,
)
from lightning_trust.federated.partition import read_column


def test_iid_covers_every_sample_once():
    ds = TensorDataset(torch.randn(103, 2), torch.randint(0, 3, (103,)))
    parts = IID().split(ds, 4, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == IID().split(ds, 4, seed=1) and parts != IID().split(ds, 4, seed=2)


def test_dirichlet_skews_labels_and_is_seeded():
    labels = np.repeat(np.arange(4), 250)
    ds = TensorDataset(torch.randn(1000, 2), torch.as_tensor(labels))
    skewed = Dirichlet(0.1).split(ds, 5, seed=0)
    flat = Dirichlet(1000.0).split(ds, 5, seed=0)
    assert sorted(i for p in skewed for i in p) == list(range(1000))
    assert skewed == Dirichlet(0.1).split(ds, 5, seed=0)

    def mean_max_share(parts):
        hist = np.asarray(partition_summary(parts, labels)["label_histograms"], dtype=float)
        return float((hist.max(1) / hist.sum(1)).mean())

    assert mean_max_share(skewed) > 0.6 > 0.35 > mean_max_share(flat)


def test_by_key_on_adult_native_region(adult):
    contract = BatchContract.resolve(None, type("T", (), {"datamodule": adult})())
    parts = ByKey("native_region").split(adult.train_dataset, None, contract=contract)
    regions = adult.train_dataset.tensors["native_region"].numpy()
    assert [len(p) for p in parts] == [int((regions == v).sum()) for v in np.unique(regions)]
    assert all((regions[p] == regions[p[0]]).all() for p in parts)
    with pytest.raises(ValueError, match="num_clients"):
        ByKey("native_region").split(adult.train_dataset, 3, contract=contract)
    np.testing.assert_array_equal(
        read_column(adult.train_dataset, contract, "target"), adult.train_dataset.tensors["y"].numpy()
    )


def test_partition_specs():
    assert isinstance(resolve_partition("iid"), IID)
    assert resolve_partition("dirichlet(0.3)").alpha == 0.3
    assert resolve_partition("dirichlet:2").alpha == 2.0
    assert resolve_partition("by_key(race)").key == "race"
    with pytest.raises(ValueError, match="Unknown partition"):
        resolve_partition("shards")


class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)


def test_server_buffer_rule_and_keep_local():
    model = _BN()
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n for n, _ in model.named_parameters()}
    states = []
    for i in range(2):
        s = {k: v.clone() for k, v in glob.items()}
        s["lin.weight"] += i + 1
        s["bn.running_mean"] += 10 * (i + 1)
        s["bn.num_batches_tracked"] += 3 * (i + 1)
        s["bn.weight"] += 5
        states.append(s)
    updates = [ClientUpdate(0, states[0], 1), ClientUpdate(1, states[1], 3)]
    new, metrics = Server("fedavg").aggregate(glob, updates, params)
    torch.testing.assert_close(new["lin.weight"], glob["lin.weight"] + 0.25 * 1 + 0.75 * 2)
    torch.testing.assert_close(new["bn.running_mean"], glob["bn.running_mean"] + 0.25 * 10 + 0.75 * 20)
    assert int(new["bn.num_batches_tracked"]) == 6  # integer counters: the maximum
    assert metrics["clients_aggregated"] == 2 and metrics["update_norm_max"] > metrics["update_norm_mean"] > 0
    local, _ = Server("fedavg", keep_local=["bn"]).aggregate(glob, updates, params)  # FedBN
    for k in ("bn.weight", "bn.running_mean", "bn.num_batches_tracked"):
        torch.testing.assert_close(local[k], glob[k])
    torch.testing.assert_close(local["lin.weight"], new["lin.weight"])


def test_client_dp_clips_noises_and_accounts_with_opacus():
    dp = ClientDP(clip_norm=1.0, noise_multiplier=0.8, delta=1e-4, seed=3)
    big = {"w": torch.full((100,), 1.0)}  # norm 10
    assert ClientDP.norm(dp.clip(big)) == pytest.approx(1.0)
    small = {"w": torch.full((100,), 0.01)}
    torch.testing.assert_close(dp.clip(small)["w"].float(), small["w"])
    # noise: std z*C/expected per coordinate
    out = dp.privatize([], expected_clients=4.0, template={"w": torch.zeros(20000)})
    assert float(out["w"].std()) == pytest.approx(0.8 * 1.0 / 4.0, rel=0.03)
    for _ in range(30):
        dp.account(sample_rate=0.2)
    ref = RDPAccountant()
    for _ in range(30):
        ref.step(noise_multiplier=0.8, sample_rate=0.2)
    assert dp.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-4))
    clone = ClientDP(clip_norm=1.0, noise_multiplier=0.8, delta=1e-4, seed=99)
    clone.load_state_dict(dp.state_dict())
    assert clone.epsilon() == dp.epsilon()
    a = dp.privatize([], 1.0, {"w": torch.zeros(3)})
    b = clone.privatize([], 1.0, {"w": torch.zeros(3)})
    torch.testing.assert_close(a, b)  # the noise generator state travels with the checkpoint


def test_dp_with_a_robust_aggregator_is_refused():
    with pytest.raises(ValueError, match="robust"):
        Server("median", client_dp=ClientDP())
    with pytest.raises(ValueError, match="noise_multiplier"):
        ClientDP(noise_multiplier=0)
