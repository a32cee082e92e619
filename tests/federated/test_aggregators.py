import numpy as np
import pytest
import torch

from lightning_trust.federated import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    resolve_aggregator,
)

flwr_aggregate = pytest.importorskip("flwr.server.strategy.aggregate")


def _clients(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4)}
    glob = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    clients = [{k: glob[k] + 0.3 * torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n)]
    counts = [int(c) for c in torch.randint(10, 500, (n,), generator=g)]
    return glob, clients, counts


def _nd(state):
    return [state[k].numpy() for k in state]


def test_fedavg_equals_flower_weighted_average():
    glob, clients, counts = _clients()
    ours = FedAvg().aggregate(glob, clients, counts)
    flower = flwr_aggregate.aggregate([(_nd(c), n) for c, n in zip(clients, counts)])
    for (_k, v), ref in zip(ours.items(), flower):
        np.testing.assert_allclose(v.numpy(), ref, atol=1e-6, rtol=0)


def test_fedavg_equals_flower_message_api_aggregate():
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    glob, clients, counts = _clients(seed=1)
    records = [
        RecordDict({"arrays": ArrayRecord.from_torch_state_dict(c), "metrics": MetricRecord({"num-examples": n})})
        for c, n in zip(clients, counts)
    ]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    ours = FedAvg().aggregate(glob, clients, counts)
    for k in ours:
        torch.testing.assert_close(ours[k], flower[k].float(), atol=1e-6, rtol=0)


def _hand_adaptive(kind, glob, rounds, lr, b1, b2, tau):
    """Reddi et al. (2021) Algorithm 2 written out on numpy, m0 = 0, v0 = tau^2."""
    x = {k: v.double().numpy().copy() for k, v in glob.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.full_like(val, tau**2) for k, val in x.items()}
    for clients, counts in rounds:
        w = np.asarray(counts, dtype=np.float64) / sum(counts)
        for k in x:
            d = sum(wi * (c[k].double().numpy() - x[k]) for wi, c in zip(w, clients))
            m[k] = b1 * m[k] + (1 - b1) * d
            if kind == "adagrad":
                v[k] = v[k] + d**2
            elif kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * d**2
            else:
                v[k] = v[k] - (1 - b2) * d**2 * np.sign(v[k] - d**2)
            x[k] = x[k] + lr * m[k] / (np.sqrt(v[k]) + tau)
    return x


@pytest.mark.parametrize("cls,kind", [(FedAdagrad, "adagrad"), (FedAdam, "adam"), (FedYogi, "yogi")])
def test_adaptive_server_optimizers_match_reddi_hand_computation(cls, kind):
    glob, clients1, counts1 = _clients(seed=2)
    _, clients2, counts2 = _clients(seed=3)
    agg = cls(server_lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    x1 = agg.aggregate(glob, clients1, counts1)
    # round 2: clients moved relative to the new global
    clients2 = [{k: x1[k] + (c[k] - glob[k]) for k in c} for c in clients2]
    x2 = agg.aggregate(x1, clients2, counts2)
    hand = _hand_adaptive(kind, glob, [(clients1, counts1), (clients2, counts2)], 0.05, 0.9, 0.99, 1e-3)
    for k in x2:
        np.testing.assert_allclose(x2[k].double().numpy(), hand[k], atol=1e-5, rtol=0)


def test_server_optimizer_state_round_trips():
    glob, clients, counts = _clients(seed=4)
    a = FedAdam(server_lr=0.1)
    x1 = a.aggregate(glob, clients, counts)
    b = FedAdam(server_lr=0.1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.aggregate(x1, clients, counts), b.aggregate(x1, clients, counts))


def test_fedavgm_momentum_by_hand():
    glob, clients, counts = _clients(seed=5)
    agg = FedAvgM(server_lr=0.5, momentum=0.9)
    avg = FedAvg().aggregate(glob, clients, counts)
    x1 = agg.aggregate(glob, clients, counts)
    d1 = {k: avg[k] - glob[k] for k in glob}
    torch.testing.assert_close(x1, {k: glob[k] + 0.5 * d1[k] for k in glob})
    x2 = agg.aggregate(x1, [{k: x1[k] + d1[k] for k in glob}] * 2, [1, 1])  # same update again
    torch.testing.assert_close(x2, {k: x1[k] + 0.5 * (0.9 * d1[k] + d1[k]) for k in glob}, atol=1e-5, rtol=0)


def test_robust_aggregators_equal_flower_implementations():
    glob, clients, counts = _clients(n=7, seed=6)
    results = [(_nd(c), n) for c, n in zip(clients, counts)]
    for ours, ref in [
        (Median().aggregate(glob, clients, counts), flwr_aggregate.aggregate_median(results)),
        (TrimmedMean(0.2).aggregate(glob, clients, counts), flwr_aggregate.aggregate_trimmed_avg(results, 0.2)),
        (Krum(f=2).aggregate(glob, clients, counts), flwr_aggregate.aggregate_krum(results, 2, 0)),
        (
            MultiKrum(f=2, m=3).aggregate(glob, clients, [1] * 7),
            flwr_aggregate.aggregate_krum([(r[0], 1) for r in results], 2, 3),
        ),
    ]:
        for v, r in zip(ours.values(), ref):
            np.testing.assert_allclose(v.numpy(), r, atol=1e-6, rtol=0)
    # even count: the median is the mean of the two middle values, like numpy
    even = Median().aggregate(glob, clients[:4], counts[:4])
    np.testing.assert_allclose(
        even["a.bias"].numpy(), np.median([c["a.bias"].numpy() for c in clients[:4]], axis=0), atol=1e-6
    )


def test_robust_rules_ignore_a_sign_flipping_minority():
    glob = {"w": torch.zeros(3)}
    honest = [{"w": torch.tensor([1.0, 1.0, 1.0]) + 0.01 * i} for i in range(8)]
    attackers = [{"w": torch.tensor([-10.0, -10.0, -10.0])} for _ in range(2)]
    clients, counts = honest + attackers, [1] * 10
    assert FedAvg().aggregate(glob, clients, counts)["w"].mean() < 0  # dragged the wrong way
    for agg in (Median(), TrimmedMean(0.2), Krum(f=2), MultiKrum(f=2)):
        assert agg.aggregate(glob, clients, counts)["w"].min() > 0.9, agg


def test_resolution_and_validation():
    assert isinstance(resolve_aggregator("FedAdam"), FedAdam)
    assert isinstance(resolve_aggregator("trimmed_mean"), TrimmedMean)
    with pytest.raises(ValueError, match="Unknown aggregator"):
        resolve_aggregator("fedsgd")
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(0.5)
    with pytest.raises(ValueError, match="server_lr"):
        FedAdam(server_lr=0)
    with pytest.raises(ValueError, match="2f \\+ 2"):
        Krum(f=2).aggregate({"w": torch.zeros(1)}, [{"w": torch.ones(1)}] * 5, [1] * 5)
    with pytest.raises(ValueError, match="weights"):
        FedAvg().aggregate({"w": torch.zeros(1)}, [{"w": torch.ones(1)}], [0])
