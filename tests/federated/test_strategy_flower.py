import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_trust.federated import FedAvg
from tests.ddp_harness import run_ddp

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.ddp
def test_federated_strategy_two_processes_aggregate_like_the_single_process_computation(tmp_path):
    results = run_ddp(
        """
        from lightning_trust.federated.strategy import FederatedStrategy

        states = []
        original = FederatedStrategy.aggregate_pending

        def recording(self):
            if self._pending_steps:
                states.append({"global": {k: v.tolist() for k, v in self._global.items()},
                               "local": {k: v.tolist() for k, v in self.lightning_module.state_dict().items()},
                               "samples": self._pending_samples})
            original(self)

        FederatedStrategy.aggregate_pending = recording
        pl.seed_everything(0)
        strategy = FederatedStrategy(local_steps=4, aggregator="fedavg")
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=8,
                             limit_val_batches=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0)
        model = TabularMLP()
        trainer.fit(model, AdultDataModule(batch_size=64))
        save_result({"states": states, "final": {k: v.tolist() for k, v in model.state_dict().items()},
                     "rounds": strategy.round, "val_acc": float(trainer.callback_metrics["val/acc"]),
                     "report": strategy.report(), "callbacks": [type(c).__name__ for c in trainer.callbacks]})
        """,
        tmp_path,
    )
    r0, r1 = results
    assert r0["rounds"] == r1["rounds"] == 2
    assert "_StrategyState" in r0["callbacks"] and r0["report"]["num_clients"] == 2
    # the local models differ (no gradient all-reduce) ...
    first = [r["states"][0]["local"]["features.0.weight"] for r in results]
    assert not torch.allclose(torch.tensor(first[0]), torch.tensor(first[1]))
    # ... and each round's aggregate equals FedAvg computed here in one process
    for rnd in range(2):
        glob = {k: torch.tensor(v) for k, v in r0["states"][rnd]["global"].items()}
        locals_ = [{k: torch.tensor(v) for k, v in r["states"][rnd]["local"].items()} for r in results]
        samples = [r["states"][rnd]["samples"] for r in results]
        keys = [k for k in glob if "weight" in k or "bias" in k]
        expected = FedAvg().aggregate({k: glob[k] for k in keys}, [{k: s[k] for k in keys} for s in locals_], samples)
        nxt = r0["states"][rnd + 1]["global"] if rnd == 0 else r0["final"]
        for k in keys:
            torch.testing.assert_close(torch.tensor(nxt[k]), expected[k], atol=1e-6, rtol=0)
    for k in r0["final"]:
        assert r0["final"][k] == r1["final"][k]  # every process holds the same global model
    assert r0["val_acc"] == pytest.approx(r1["val_acc"])


@pytest.mark.slow
def test_flower_simulation_two_clients_two_rounds(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    out = tmp_path / "flower.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "flower" / "run_simulation.py"),
            "--clients",
            "2",
            "--rounds",
            "2",
            "--local-steps",
            "5",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["rounds"] == 2 and sorted(result["train_metrics"]) == ["1", "2"]
    for metrics in result["train_metrics"].values():
        assert metrics["federated_clients_aggregated"] == 2.0  # both Flower clients reported each round
        assert metrics["train_loss"] > 0
    assert 0.6 < result["final_val"]["val/acc"] <= 1.0


def test_flower_strategy_aggregates_with_our_server():
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from lightning_trust.federated.flower import flower_strategy

    glob = {"w": torch.zeros(3), "b": torch.zeros(1)}
    clients = [
        ({"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([1.0])}, 10),
        ({"w": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([3.0])}, 30),
    ]
    strategy = flower_strategy("fedavg", param_keys=["w", "b"], min_train_nodes=2, min_available_nodes=2)
    strategy.current = glob

    class _Reply:
        def __init__(self, state, n):
            self.content = RecordDict(
                {
                    "arrays": ArrayRecord.from_torch_state_dict(state),
                    "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
                }
            )
            self.metadata = None

        def has_error(self):
            return False

    arrays, metrics = strategy.aggregate_train(1, [_Reply(s, n) for s, n in clients])
    new = arrays.to_torch_state_dict()
    expected = FedAvg().aggregate(glob, [c[0] for c in clients], [c[1] for c in clients])
    for k in expected:
        torch.testing.assert_close(new[k].float(), expected[k])
    assert metrics["federated_clients_aggregated"] == 2.0 and "train_loss" in metrics


@pytest.mark.slow
def test_federated_strategy_dp_fedadam_resumes_identically_in_one_process(adult, tmp_path):
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from opacus.accountants import RDPAccountant

    from lightning_trust.demo import TabularMLP
    from lightning_trust.federated import ClientDP, FedAdam, FederatedStrategy
    from tests.federated.helpers import check_declared_keys, params
    from tests.support import AdultSubset

    dm = AdultSubset(adult, n_train=1024, n_val=256, batch_size=64, pick="random")

    def fit(max_epochs, ckpt_path=None, callbacks=()):
        strategy = FederatedStrategy(
            local_steps=3,
            aggregator=FedAdam(server_lr=0.05),
            proximal_mu=0.1,
            client_dp=ClientDP(clip_norm=1.0, noise_multiplier=0.5, delta=1e-3, seed=1),
        )
        model = TabularMLP()
        trainer = pl.Trainer(
            strategy=strategy,
            accelerator="cpu",
            devices=1,
            max_epochs=max_epochs,
            limit_train_batches=6,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            default_root_dir=tmp_path,
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return strategy, model, trainer

    try:
        pl.seed_everything(0)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        full_strategy, full, trainer = fit(3, callbacks=[ckpt])
        assert full_strategy.round == 6  # 6 batches / 3 local steps per epoch
        ref = RDPAccountant()
        for _ in range(6):
            ref.step(noise_multiplier=0.5, sample_rate=1.0)
        assert full_strategy.report()["epsilon"] == pytest.approx(ref.get_epsilon(1e-3))
        assert float(trainer.callback_metrics["federated/epsilon"]) == pytest.approx(ref.get_epsilon(1e-3), rel=1e-5)
        check_declared_keys(full_strategy.state_callback, full_strategy.report(), trainer.callback_metrics)
        pl.seed_everything(0)  # the same job resumed: Lightning's DistributedSampler shuffles with this seed
        resumed_strategy, resumed, _ = fit(3, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
        assert resumed_strategy.round == 6
        for k, v in params(full).items():
            torch.testing.assert_close(params(resumed)[k], v, atol=1e-6, rtol=0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
