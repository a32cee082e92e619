"""Federated training for any LightningModule: aggregators, client-level DP, partitioning, an
in-process simulation callback, a Lightning strategy across processes, and a Flower adapter.

``flwr`` is imported only by :mod:`lightning_trust.federated.flower` (extra ``federated``).
"""

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
