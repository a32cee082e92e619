"""Federated training for any LightningModule: aggregators, client-level DP, partitioning, an
in-process simulation callback, a Lightning strategy across processes, and a Flower adapter.

``flwr`` is imported only by :mod:`lightning_trust.federated.flower` (extra ``federated``).

How :class:`FederatedSimulation` (mode 1, :mod:`~lightning_trust.federated.simulation`) runs: one
Lightning epoch is one round. The callback partitions the dataset of the user's training
DataLoader into clients once and, each round, feeds Lightning a *round loader*
(:mod:`lightning_trust.federated.rounds`): the batches of the selected clients one after another
(client loaders mirror the user's: same batch size, collate function, workers, ``drop_last``;
shuffled when the user's loader shuffles). Lightning runs the user's own ``training_step``,
backward and optimizer from ``configure_optimizers`` (so precision, gradient clipping and other
callbacks apply unchanged). Around each client's batches the callback

* loads the current global weights (the payload: with ``payload="trainable"`` only the trainable
  tensors and buffers, :mod:`~lightning_trust.federated.payload`; plus the client's ``keep_local``
  entries) and clears the optimizer state, as FedAvg-style algorithms assume;
* adds the FedProx proximal gradient ``mu * (w - w_global)`` before each optimizer step (the
  user's loss is unchanged);
* after the client's last step, takes its payload as its update (or drops it when the client
  fails, ``dropout_rate``);

and after the round's last batch it aggregates (:class:`~lightning_trust.federated.server.Server`),
loads the new global weights, so Lightning's validation runs on the global model, and logs
``federated/*`` metrics (:mod:`~lightning_trust.federated.bookkeeping`). Which clients train in a
round is the overridable :meth:`FederatedSimulation.select_clients`. The state (round, global
weights, server optimizer, client sampler RNG, DP accountant, FedBN local weights, history) is
checkpointed; resuming continues identically.
"""

from lightning_trust.federated.adaptive import AdaptiveClipping
from lightning_trust.federated.aggregators import (
    AGGREGATORS,
    Aggregator,
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
from lightning_trust.federated.dp import ClientDP
from lightning_trust.federated.partition import IID, ByKey, Dirichlet, Partitioner, partition_summary, resolve_partition
from lightning_trust.federated.server import ClientUpdate, Server
from lightning_trust.federated.simulation import FederatedSimulation
from lightning_trust.federated.strategy import FederatedStrategy

__all__ = [
    "AGGREGATORS",
    "IID",
    "AdaptiveClipping",
    "Aggregator",
    "ByKey",
    "ClientDP",
    "ClientUpdate",
    "Dirichlet",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "FederatedSimulation",
    "FederatedStrategy",
    "Krum",
    "Median",
    "MultiKrum",
    "Partitioner",
    "Server",
    "TrimmedMean",
    "partition_summary",
    "resolve_aggregator",
    "resolve_partition",
]
