"""DP-FedAvg with adaptive clipping (Andrew et al., 2021) against a hand computation and against
Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` on the same client updates.

What Flower 1.42 does differently (asserted here, so a Flower change shows up): it steps the clip
norm with the fraction of *clipped* updates where the paper uses the unclipped one, so with
``target_quantile=0.5`` its log-step is exactly the negative of ours, and its clip norm shrinks when
every update is clipped; and it noises the aggregate with the clip norm of the *next* round.
"""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from lightning_trust.federated import ClientDP, ClientUpdate, FederatedSimulation, Server
from lightning_trust.federated.adaptive import AdaptiveClipping

NORMS = (0.5, 1.0, 2.0, 4.0)


def _updates(glob, norms=NORMS, seed=0):
    """Client weights whose updates from ``glob`` have the given L2 norms (over all tensors)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for norm in norms:
        direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in glob.items()}
        scale = norm / math.sqrt(sum(float(d.pow(2).sum()) for d in direction.values()))
        out.append({k: (glob[k].double() + scale * d).float() for k, d in direction.items()})
    return out


def _ours(initial=0.1, noise=0.0, count_stddev=None, quantile=0.5, lr=0.2):
    dp = ClientDP(clip_norm=initial, noise_multiplier=1.0, delta=1e-3,
                  adaptive=AdaptiveClipping(quantile, lr, count_stddev))  # fmt: skip
    dp.noise_multiplier = noise  # ClientDP refuses 0 (no guarantee); the comparison needs it noise-free
    return dp, Server("fedavg", client_dp=dp)


def _flower(initial=0.1, noise=0.0, count_stddev=None, n=4):
    pytest.importorskip("flwr")
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

    return DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=noise, num_sampled_clients=n, initial_clipping_norm=initial,
        target_clipped_quantile=0.5, clip_norm_lr=0.2, clipped_count_stddev=count_stddev,
    )  # fmt: skip


def _flower_round(strategy, glob, clients):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    class Reply:
        def __init__(self, state):
            self.content = RecordDict(
                {"arrays": ArrayRecord.from_torch_state_dict(state), "metrics": MetricRecord({"num-examples": 10})}
            )
            self.metadata = None

        def has_error(self):
            return False

    strategy.current_arrays = ArrayRecord.from_torch_state_dict(glob)
    arrays, _ = strategy.aggregate_train(1, [Reply(c) for c in clients])
    return {k: v.double() for k, v in arrays.to_torch_state_dict().items()}


def _glob(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g)}


def test_clip_norm_follows_andrew_et_al_by_hand_and_the_aggregate_equals_flowers():
    dp, server = _ours()
    flower = _flower()
    glob, clip = _glob(), 0.1
    for rnd in range(8):
        clients = _updates(glob, seed=rnd)
        updates = [ClientUpdate(i, c, 10) for i, c in enumerate(clients)]
        new, metrics = server.aggregate(glob, updates, set(glob), expected_clients=4)
        # by hand: unclipped share b = #(norm <= C) / m, C <- C exp(-0.2 (b - 0.5)); mean of the clipped updates
        unclipped = sum(n <= clip for n in NORMS) / 4
        expected_clip = clip * math.exp(-0.2 * (unclipped - 0.5))
        assert metrics["clip_norm"] == pytest.approx(clip, rel=1e-12)
        assert metrics["unclipped_fraction"] == pytest.approx(unclipped, abs=1e-12)
        assert dp.clip_norm == pytest.approx(expected_clip, rel=1e-12)
        # Flower on the same updates with the same clip norm: the same aggregate ...
        flower.clipping_norm = clip
        theirs = _flower_round(flower, glob, clients)
        for k in glob:
            torch.testing.assert_close(new[k].double(), theirs[k], atol=1e-6, rtol=0)
        # ... but the clip step counts the clipped updates: the mirror of ours at target 0.5
        assert math.log(flower.clipping_norm / clip) == pytest.approx(-0.2 * ((1 - unclipped) - 0.5), abs=1e-9)
        assert math.log(flower.clipping_norm / clip) == pytest.approx(-math.log(dp.clip_norm / clip), abs=1e-9)
        glob, clip = {k: v.float() for k, v in new.items()}, dp.clip_norm


def test_ours_converges_to_the_median_update_norm_and_flowers_shrinks():
    norms = (0.5, 1.0, 2.0, 4.0, 8.0)
    dp, server = _ours()
    flower = _flower(n=len(norms))
    glob = _glob()
    for rnd in range(80):
        clients = _updates(glob, norms, seed=rnd)
        server.aggregate(glob, [ClientUpdate(i, c, 10) for i, c in enumerate(clients)], set(glob), 5)
        _flower_round(flower, glob, clients)
    assert 1.0 < dp.clip_norm < 4.0, dp.clip_norm  # around the median norm (2.0)
    assert flower.clipping_norm < 1e-3, flower.clipping_norm  # every update clipped, and the clip shrinks


def test_noise_split_equals_flowers_and_noise_uses_the_clip_of_the_round(monkeypatch):
    pytest.importorskip("flwr")
    from flwr.serverapp.strategy import dp_adaptive_clipping
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    z, m, count = 1.0, 4, 2.0
    z_delta, count_std = AdaptiveClipping(count_stddev=count).noise_split(z, m)
    assert (count_std, z_delta) == pytest.approx(compute_adaptive_noise_params(z, m, count))
    assert AdaptiveClipping().noise_split(1.0, 100)[1] == compute_adaptive_noise_params(1.0, 100, None)[0] == 5.0
    # ours: the update's noise has std z_delta * C_t / m, with C_t the clip norm the round used
    dp, _ = _ours(initial=0.5, noise=z, count_stddev=count)
    template = {"w": torch.zeros(40000)}
    noise = dp.privatize([], expected_clients=m, template=template)["w"]
    assert float(noise.std()) == pytest.approx(z_delta * 0.5 / m, rel=0.02)
    assert dp.last_round["clip_norm"] == 0.5 and dp.clip_norm != 0.5
    # Flower: the same z_delta, but times the clip norm it has just moved to (C_{t+1})
    seen = []
    real = dp_adaptive_clipping.add_gaussian_noise_inplace
    monkeypatch.setattr(dp_adaptive_clipping, "add_gaussian_noise_inplace", lambda a, s: (seen.append(s), real(a, s)))
    flower = _flower(initial=0.5, noise=z, count_stddev=count)
    np.random.seed(0)
    glob = {"w": torch.zeros(8)}
    _flower_round(flower, glob, _updates(glob))
    assert flower.noise_multiplier == pytest.approx(z_delta)
    assert seen == [pytest.approx(z_delta * flower.clipping_norm / m)] and flower.clipping_norm != 0.5


def test_adaptive_settings_are_validated_and_the_clip_norm_is_checkpointed():
    with pytest.raises(ValueError, match="target_quantile"):
        AdaptiveClipping(target_quantile=1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        AdaptiveClipping(learning_rate=0)
    with pytest.raises(ValueError, match=r"count_stddev > 0.5.*Set `AdaptiveClipping\(count_stddev=...\)`"):
        ClientDP(noise_multiplier=1.0, adaptive=AdaptiveClipping()).check_clients(10)  # 10 / 20 = 0.5
    with pytest.raises(TypeError, match="AdaptiveClipping"):
        ClientDP(adaptive=0.5)
    dp, server = _ours(noise=0.5, count_stddev=1.0)
    glob = _glob()
    server.aggregate(glob, [ClientUpdate(i, c, 1) for i, c in enumerate(_updates(glob))], set(glob), 4)
    clone = ClientDP(clip_norm=0.1, noise_multiplier=0.5, adaptive=AdaptiveClipping(count_stddev=1.0))
    clone.load_state_dict(dp.state_dict())
    assert clone.clip_norm == dp.clip_norm != 0.1
    assert dp.report()["initial_clip_norm"] == 0.1 and "adaptive clipping" in dp.report()["mechanism"]


@pytest.mark.slow
def test_simulation_with_adaptive_clipping_logs_the_clip_norm_and_accounts_like_opacus(adult):
    from lightning_trust.demo import TabularMLP
    from tests.support import AdultSubset, trainer

    dp = ClientDP(clip_norm=0.1, noise_multiplier=0.5, delta=1e-3, seed=2, adaptive=AdaptiveClipping())
    sim = FederatedSimulation(num_clients=8, clients_per_round=8, local_steps=3, client_dp=dp, seed=0)
    t = trainer(max_epochs=4, callbacks=[sim])
    t.fit(TabularMLP(), AdultSubset(adult, 1024, 256, batch_size=64, pick="random"))
    clips = [r["clip_norm"] for r in sim.history]
    assert clips[0] == 0.1 and len(set(clips)) == 4  # it moves every round
    for before, after, record in zip(clips, clips[1:], sim.history):
        assert after == pytest.approx(before * math.exp(-0.2 * (record["unclipped_fraction"] - 0.5)))
    assert float(t.callback_metrics["federated/clip_norm"]) == pytest.approx(clips[-1])
    ref = RDPAccountant()
    for _ in range(4):
        ref.step(noise_multiplier=0.5, sample_rate=1.0)  # the user's z covers the update and the count together
    assert sim.report()["epsilon"] == pytest.approx(ref.get_epsilon(1e-3))
    assert sim.report()["client_dp"]["adaptive"]["target_quantile"] == 0.5
