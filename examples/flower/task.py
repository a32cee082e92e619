"""The pieces a Flower deployment needs, built from a plain LightningModule and DataModule.

Used by ``run_simulation.py`` (Flower's simulation engine, Python API) and by ``flwr run .``
(``pyproject.toml`` in this folder points Flower at ``client_app``/``server_app`` below).
"""

from __future__ import annotations

import os

import torch

from lightning_trust.demo import AdultDataModule, TabularMLP
from lightning_trust.federated.flower import client_app, flower_strategy, server_app

LOCAL_STEPS = int(os.environ.get("LT_FLOWER_LOCAL_STEPS", "20"))
NUM_ROUNDS = int(os.environ.get("LT_FLOWER_ROUNDS", "3"))
AGGREGATOR = os.environ.get("LT_FLOWER_AGGREGATOR", "fedavg")


def make_module() -> TabularMLP:
    # seeded: the server's initial global weights (and so a short run's accuracy) do not depend on
    # whatever the process drew from torch's generator before
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TabularMLP(input_dim=104, hidden_dims=[64, 32], lr=1e-3)


def make_datamodule() -> AdultDataModule:
    return AdultDataModule(batch_size=128)


def make_client_app(local_steps: int = LOCAL_STEPS, partition: str = "dirichlet(0.5)"):
    # each SuperNode trains on its partition (`partition-id` of `num-partitions`) of Adult
    return client_app(make_module, make_datamodule, partition=partition, local_steps=local_steps, seed=0)


def make_server_app(num_rounds: int = NUM_ROUNDS, aggregator: str = AGGREGATOR, on_result=None, num_nodes: int = 2):
    # our aggregator inside a Flower Strategy; any flwr.serverapp.strategy.* works here too
    strategy = flower_strategy(
        aggregator,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=num_nodes,
        min_evaluate_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    return server_app(make_module, strategy=strategy, num_rounds=num_rounds, on_result=on_result)


# what `flwr run .` loads (see pyproject.toml)
app = make_client_app()
server = make_server_app()
