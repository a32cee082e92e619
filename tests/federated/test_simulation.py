import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from opacus.accountants import RDPAccountant

from lightning_trust.core import IncompatibleCallbacksError
from lightning_trust.demo import TabularMLP
from lightning_trust.federated import ClientDP, FedAdam, FederatedSimulation
from tests.federated.helpers import PlainSGDMLP, check_declared_keys, params
from tests.support import AdultSubset, trainer


@pytest.mark.slow
def test_one_client_full_participation_equals_centralized_training(adult):
    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=128, shuffle=False, pick="random")
    pl.seed_everything(0)
    central = PlainSGDMLP()
    trainer(max_epochs=3).fit(central, dm)
    pl.seed_everything(0)
    federated = PlainSGDMLP()
    cb = FederatedSimulation(num_clients=1, local_epochs=1)
    t = trainer(max_epochs=3, callbacks=[cb])
    t.fit(federated, dm)
    assert cb.round == 3 and t.global_step == 3 * 8
    for k, v in params(central).items():
        torch.testing.assert_close(params(federated)[k], v, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_robust_aggregators_hold_against_sign_flipping_clients(adult):
    dm = AdultSubset(adult, n_train=4000, n_val=1000, batch_size=64, pick="random")
    acc = {}
    for agg in ("fedavg", "median", "trimmedmean", "krum"):
        pl.seed_everything(0)
        cb = FederatedSimulation(
            num_clients=10, local_steps=10, aggregator=agg, byzantine_fraction=0.2, byzantine_scale=5.0, seed=0
        )
        t = trainer(max_epochs=8, callbacks=[cb])
        t.fit(TabularMLP(), dm)
        assert len(cb.byzantine_clients) == 2
        acc[agg] = float(t.callback_metrics["val/acc"])
    for agg in ("median", "trimmedmean", "krum"):
        assert acc[agg] > 0.8, acc
        assert acc[agg] - acc["fedavg"] > 0.3, acc  # FedAvg is dragged off by the 20% attackers


@pytest.mark.slow
def test_failed_clients_are_dropped_and_the_survivors_aggregated(adult):
    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=64, pick="random")
    cb = FederatedSimulation(num_clients=4, local_steps=4, dropout_rate=0.5, seed=1)
    t = trainer(max_epochs=4, callbacks=[cb])
    t.fit(TabularMLP(), dm)
    failed = [c for r in cb.history for c in r["failed"]]
    assert failed, "seeded run expected to inject failures"
    for r in cb.history:
        assert r["clients_aggregated"] == len(r["clients"]) == 4 - len(r["failed"])
        assert not set(r["clients"]) & set(r["failed"])
    assert cb.round == 4 and 0.0 < float(t.callback_metrics["val/acc"]) <= 1.0


def _resume_setup(adult):
    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=64, pick="random")

    def callback():
        return FederatedSimulation(
            num_clients=4,
            clients_per_round=2,
            local_steps=5,
            partition="dirichlet(1.0)",
            aggregator=FedAdam(server_lr=0.05),
            dropout_rate=0.25,
            seed=3,
        )

    return dm, callback


@pytest.mark.slow
def test_resume_after_a_round_reproduces_the_uninterrupted_run(adult, tmp_path):
    dm, callback = _resume_setup(adult)
    pl.seed_everything(0)
    full_cb, full = callback(), TabularMLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer(max_epochs=4, callbacks=[full_cb, ckpt], enable_checkpointing=True).fit(full, dm)

    pl.seed_everything(123)  # the resumed run must not depend on the global seed
    resumed_cb, resumed = callback(), TabularMLP()
    trainer(max_epochs=4, callbacks=[resumed_cb]).fit(resumed, dm, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert resumed_cb.round == 4
    assert [r["clients"] for r in resumed_cb.history] == [r["clients"] for r in full_cb.history]
    for k, v in params(full).items():
        torch.testing.assert_close(params(resumed)[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed_cb.aggregator.state_dict(), full_cb.aggregator.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_resume_mid_round_reproduces_the_uninterrupted_run(adult, tmp_path, proximal_mu):
    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=64, pick="random")

    def callback():
        return FederatedSimulation(
            num_clients=4,
            clients_per_round=2,
            local_steps=5,
            partition="dirichlet(1.0)",
            aggregator=FedAdam(server_lr=0.05),
            proximal_mu=proximal_mu,
            seed=3,
        )

    pl.seed_everything(0)
    full_cb, full = callback(), TabularMLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=7, filename="{step}")
    trainer(max_epochs=3, callbacks=[full_cb, ckpt], enable_checkpointing=True).fit(full, dm)
    mid = tmp_path / "step=7.ckpt"
    # round 1 is two clients x 5 steps: step 7 is the second client's 2nd step
    assert [list(r["client_steps"].values()) for r in full_cb.history] == [[5, 5]] * 3
    state = next(v for k, v in torch.load(mid, weights_only=False)["callbacks"].items() if "FederatedSimulation" in k)
    assert state["round"] == 0 and len(state["in_round"]["updates"]) == 1  # one client done, one interrupted
    resumed_cb, resumed = callback(), TabularMLP()
    trainer(max_epochs=3, callbacks=[resumed_cb]).fit(resumed, dm, ckpt_path=str(mid))
    assert [r["clients"] for r in resumed_cb.history] == [r["clients"] for r in full_cb.history]
    for k, v in params(full).items():
        torch.testing.assert_close(params(resumed)[k], v, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_client_dp_epsilon_logging_report_and_figure(adult, tmp_path):
    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=64, pick="random")
    dp = ClientDP(clip_norm=0.5, noise_multiplier=1.0, delta=1e-3)
    cb = FederatedSimulation(num_clients=8, clients_per_round=4, local_steps=3, client_dp=dp, seed=0)
    logger = CSVLogger(tmp_path, name="", version="")
    t = trainer(max_epochs=3, callbacks=[cb], logger=logger)
    t.fit(TabularMLP(), dm)
    ref = RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=1.0, sample_rate=0.5)
    assert float(t.callback_metrics["federated/epsilon"]) == pytest.approx(ref.get_epsilon(1e-3), rel=1e-5)
    report = cb.report()
    assert report["epsilon"] == pytest.approx(ref.get_epsilon(1e-3), rel=1e-5) and report["delta"] == 1e-3
    assert report["rounds"] == 3 and report["num_clients"] == 8 and report["clients_per_round"] == 4
    assert report["aggregator"] == "FedAvg" and len(report["per_round"]) == 3
    assert report["partition"]["sizes"] == [128] * 8 and len(report["partition"]["label_histograms"]) == 8
    assert "val/acc" in report["final_val"]
    assert report["figures"]["rounds"].endswith("rounds.png")
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    assert {"federated/epsilon", "federated/round", "federated/update_norm_mean", "federated/client_drift"} <= columns
    assert any(c.startswith("federated/client_") and c.endswith("/train_loss") for c in columns)
    check_declared_keys(cb, report, columns)
    eps = [r["epsilon"] for r in report["per_round"]]
    assert eps == sorted(eps) and eps[0] > 0  # privacy loss grows with every released round


@pytest.mark.slow
def test_fedprox_pulls_clients_towards_the_global_model(adult):
    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=64, pick="random")
    norms = {}
    for mu in (0.0, 5.0):
        pl.seed_everything(0)
        cb = FederatedSimulation(num_clients=4, local_steps=10, proximal_mu=mu, partition="dirichlet(0.3)")
        trainer(max_epochs=1, callbacks=[cb]).fit(PlainSGDMLP(), dm)
        norms[mu] = cb.history[0]["update_norm_mean"]
    assert norms[5.0] < 0.8 * norms[0.0], norms


@pytest.mark.slow
def test_keep_local_and_by_key_partition(adult):
    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=64, pick="random")
    pl.seed_everything(0)
    model = TabularMLP()
    init = params(model)
    cb = FederatedSimulation(num_clients=None, partition="by_key(race)", local_steps=3, keep_local=["classifier"])
    trainer(max_epochs=2, callbacks=[cb]).fit(model, dm)
    assert cb.num_clients == len(cb.partition_info["sizes"]) == len(torch.unique(adult.train_dataset.tensors["race"]))
    assert cb.partition_info["names"][0] == "race=0"
    torch.testing.assert_close(params(model)["classifier.weight"], init["classifier.weight"])  # never aggregated
    assert not torch.equal(params(model)["features.0.weight"], init["features.0.weight"])
    locals_ = [s["classifier.weight"] for s in cb._local_states.values()]
    assert len(locals_) == cb.num_clients and not torch.equal(locals_[0], locals_[1])


def test_bad_configuration_fails_early(adult):
    with pytest.raises(ValueError, match="either `local_steps` or `local_epochs`"):
        FederatedSimulation(local_steps=2, local_epochs=1)
    with pytest.raises(ValueError, match="exceeds"):
        FederatedSimulation(num_clients=3, clients_per_round=4)
    with pytest.raises(ValueError, match="num_clients"):
        FederatedSimulation(num_clients=None)
    with pytest.raises(ValueError, match="robust"):
        FederatedSimulation(aggregator="krum", client_dp=ClientDP())
    from lightning_trust.privacy import DifferentialPrivacy

    with pytest.raises(IncompatibleCallbacksError, match="client_dp=ClientDP"):
        trainer(
            max_epochs=1,
            callbacks=[
                FederatedSimulation(num_clients=2),
                DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0),
            ],
        ).fit(TabularMLP(), AdultSubset(adult, 256, 64, batch_size=64, pick="random"))
    cb = FederatedSimulation(num_clients=2)
    with pytest.raises(ValueError, match="limit_train_batches"):
        trainer(max_epochs=1, callbacks=[cb], limit_train_batches=3).fit(
            TabularMLP(), AdultSubset(adult, 256, 64, batch_size=64, pick="random")
        )
