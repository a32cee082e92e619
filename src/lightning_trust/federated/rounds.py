"""The parts of a simulated round: which clients train how many steps, their loaders, and the
round loader that feeds their batches to Lightning one client after another.

A round is planned as a list of :class:`ClientSegment` (client, first batch index, steps,
failed); :class:`RoundLoader` yields each segment's batches from that client's
:func:`client_loader`, a DataLoader over the client's share that mirrors the user's loader.
Client shuffling is seeded per ``(seed, round, client)`` by :func:`client_seed`, so the
simulation and the Flower adapter shuffle a client's data alike and a resumed run reshuffles
identically.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> user = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2)
    >>> loaders = {c: client_loader(user, range(4 * c, 4 * c + 4), torch.Generator()) for c in (0, 1)}
    >>> segments = plan_segments([0, 1], lambda client: 3, dropout_rate=0.0, generator=torch.Generator())
    >>> [(s.client, s.start, s.steps) for s in segments]
    [(0, 0, 3), (1, 3, 3)]
    >>> [batch[0].tolist() for batch in RoundLoader(segments, loaders)]
    [[0.0, 1.0], [2.0, 3.0], [0.0, 1.0], [4.0, 5.0], [6.0, 7.0], [4.0, 5.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset

from lightning_trust.federated.aggregators import Aggregator
from lightning_trust.federated.dp import ClientDP
from lightning_trust.federated.partition import Partitioner

__all__ = [
    "ClientSegment",
    "RoundLoader",
    "check_client_behaviour",
    "check_round_config",
    "check_round_size",
    "check_selection",
    "check_simulation_trainer",
    "check_user_loader",
    "client_loader",
    "client_loaders",
    "client_sample_rate",
    "client_seed",
    "client_steps",
    "expected_clients",
    "plan_segments",
]


@dataclass
class ClientSegment:
    """One client's part of a round's loader (its fields are checkpointed as a plain dict)."""

    client: int
    start: int  # first batch index of the round loader
    steps: int  # batches this client runs (fewer than planned when it fails)
    failed: bool
    idle: bool = False  # placeholder step of a round in which no client trains; its step is discarded


def client_seed(*parts: int) -> int:
    """A 32-bit seed derived from ``parts`` (``seed, round, client``): independent streams per client."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def check_round_config(
    num_clients: Optional[int],
    clients_per_round: Optional[Union[int, float]],
    local_steps: Optional[int],
    local_epochs: Optional[int],
    partitioner: Partitioner,
) -> None:
    """Refuse a round configuration of the simulation that cannot run (before any training)."""
    if num_clients is None and not partitioner.infers_num_clients:
        raise ValueError(f"`num_clients` is required with partition {partitioner!r}.")
    if num_clients is not None and (not isinstance(num_clients, int) or num_clients < 1):
        raise ValueError(f"`num_clients` must be a positive integer, got {num_clients!r}.")
    if clients_per_round is not None:
        if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, (int, float)):
            raise TypeError(f"`clients_per_round` must be an int, a float fraction or None, got {clients_per_round!r}.")
        if isinstance(clients_per_round, int) and clients_per_round < 1:
            raise ValueError(f"`clients_per_round` must be >= 1, got {clients_per_round}.")
        if isinstance(clients_per_round, float) and not 0.0 < clients_per_round <= 1.0:
            raise ValueError(f"A fractional `clients_per_round` must be in (0, 1], got {clients_per_round}.")
        if isinstance(clients_per_round, int) and num_clients is not None and clients_per_round > num_clients:
            raise ValueError(
                f"`clients_per_round` ({clients_per_round}) exceeds `num_clients` ({num_clients}); set "
                f"`clients_per_round` to at most {num_clients}."
            )
    if local_steps is not None and local_epochs is not None:
        raise ValueError("Set either `local_steps` or `local_epochs`, not both.")
    for label, value in (("local_steps", local_steps), ("local_epochs", local_epochs)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"`{label}` must be a positive integer, got {value!r}.")


def check_round_size(
    aggregator: Aggregator,
    client_dp: Optional[ClientDP],
    num_clients: Optional[int],
    clients_per_round: Optional[Union[int, float]],
) -> None:
    """Refuse (at construction, or at setup once ``by_key`` found the clients) a round that the
    aggregator (Krum's ``n > 2f + 2``) or adaptive clipping's noise split cannot work with."""
    if num_clients is None:
        return
    if (
        isinstance(clients_per_round, int)
        and not isinstance(clients_per_round, bool)
        and clients_per_round > num_clients
    ):
        raise ValueError(
            f"`clients_per_round` ({clients_per_round}) exceeds the {num_clients} clients; set `clients_per_round` "
            f"to at most {num_clients}."
        )
    per_round = expected_clients(num_clients, clients_per_round) or num_clients
    setting = "clients_per_round" if clients_per_round is not None else "num_clients"
    aggregator.check_clients(per_round, setting)
    if client_dp is not None:
        client_dp.check_clients(client_sample_rate(num_clients, clients_per_round) * num_clients)


def check_client_behaviour(
    proximal_mu: float, dropout_rate: float, byzantine_fraction: float, byzantine_scale: float
) -> None:
    """Refuse client behaviour settings of the simulation out of their range."""
    for label, value, ok, rule in (
        ("proximal_mu", proximal_mu, lambda v: v >= 0, ">= 0"),
        ("dropout_rate", dropout_rate, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("byzantine_fraction", byzantine_fraction, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("byzantine_scale", byzantine_scale, lambda v: v > 0, "> 0"),
    ):
        if not (isinstance(value, (int, float)) and ok(value)):
            raise ValueError(f"`{label}` must be {rule}, got {value!r}.")


def check_simulation_trainer(trainer: pl.Trainer) -> None:
    """Refuse Trainer settings under which the simulation's rounds cannot run."""
    if trainer.world_size > 1:
        raise RuntimeError(
            "FederatedSimulation simulates all clients in one process; it cannot run under a "
            f"{trainer.world_size}-process strategy. Use `strategy=FederatedStrategy(...)` to federate across "
            "processes, or run the simulation with devices=1."
        )
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            "FederatedSimulation needs `accumulate_grad_batches=1`: a client's round is `local_steps` optimizer "
            "steps, and accumulated gradients would mix clients."
        )
    if trainer.limit_train_batches not in (1.0, None):
        raise ValueError(
            "FederatedSimulation sets the length of each epoch (one round: the sampled clients' local steps); "
            "remove `limit_train_batches` and use `local_steps` instead."
        )


def client_sample_rate(num_clients: Optional[int], clients_per_round: Optional[Union[int, float]]) -> float:
    """Expected share of clients per round."""
    n = num_clients or 1
    if clients_per_round is None:
        return 1.0
    if isinstance(clients_per_round, float):
        return float(clients_per_round)
    return min(clients_per_round / n, 1.0)


def expected_clients(num_clients: Optional[int], clients_per_round: Optional[Union[int, float]]) -> Optional[int]:
    """Clients sampled per round (the expected number under Poisson sampling with client DP)."""
    if num_clients is None:
        return None
    if clients_per_round is None:
        return num_clients
    if isinstance(clients_per_round, float):
        return max(1, round(clients_per_round * num_clients))
    return min(clients_per_round, num_clients)


def check_selection(clients: Iterable[Any], num_clients: int, round_index: int) -> list[int]:
    """The clients ``select_clients`` returned, as ints, refused unless distinct ids in ``range(num_clients)``."""
    selected = [int(c) for c in clients]
    if len(set(selected)) != len(selected) or any(not 0 <= c < num_clients for c in selected):
        raise ValueError(
            f"`select_clients` must return distinct client ids in range({num_clients}), got {selected} for round "
            f"{round_index}."
        )
    return selected


def check_user_loader(user_loader: Any) -> DataLoader:
    """The user's training loader, if the simulation can partition it; else a clear error."""
    if not isinstance(user_loader, DataLoader):
        raise TypeError(
            "FederatedSimulation partitions the dataset of a single training DataLoader; "
            f"`train_dataloader()` returned a {type(user_loader).__name__}."
        )
    dataset = user_loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError("FederatedSimulation needs a map-style training dataset (with __len__ and __getitem__).")
    if user_loader.batch_size is None:
        raise ValueError("FederatedSimulation needs a DataLoader with `batch_size` (not a custom batch_sampler).")
    return user_loader


def client_loader(user_loader: DataLoader, indices: Iterable[int], generator: torch.Generator) -> DataLoader:
    """A DataLoader over ``indices`` of the user's dataset that mirrors the user's loader (batch size,
    collate function, workers, ``drop_last``; shuffled with ``generator`` when the user's shuffles)."""
    shuffle = isinstance(user_loader.sampler, RandomSampler)
    return DataLoader(
        Subset(user_loader.dataset, list(indices)),
        batch_size=user_loader.batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        collate_fn=user_loader.collate_fn,
        num_workers=user_loader.num_workers,
        pin_memory=user_loader.pin_memory,
        drop_last=user_loader.drop_last,
        worker_init_fn=user_loader.worker_init_fn,
    )


def client_loaders(
    user_loader: DataLoader,
    parts: Sequence[Sequence[int]],
    segments: Iterable[ClientSegment],
    seed: int,
    round_index: int,
) -> dict[int, DataLoader]:
    """The loaders of the round's clients, each shuffled by its own ``(seed, round, client)`` stream."""
    return {
        seg.client: client_loader(
            user_loader, parts[seg.client], torch.Generator().manual_seed(client_seed(seed, round_index, seg.client))
        )
        for seg in segments
    }


def client_steps(
    user_loader: DataLoader, indices: Sequence[int], local_steps: Optional[int], local_epochs: Optional[int]
) -> int:
    """A client's optimizer steps in a round: ``local_steps``, else ``local_epochs`` passes over its batches."""
    if local_steps:
        return local_steps
    return int(local_epochs or 1) * len(client_loader(user_loader, indices, torch.Generator()))


def plan_segments(
    clients: Sequence[int], steps_of: Callable[[int], int], dropout_rate: float, generator: torch.Generator
) -> list[ClientSegment]:
    """The round's segments, one per selected client in order; each client fails with probability
    ``dropout_rate`` somewhere after its first step (draws from ``generator``). A round without
    clients gets one idle placeholder step, since Lightning needs a batch to run the epoch."""
    segments, start = [], 0
    for client in clients:
        steps = steps_of(client)
        failed = bool(torch.rand(1, generator=generator).item() < dropout_rate)
        if failed:  # fails somewhere in the round, after at least one step of work
            steps = int(torch.randint(1, steps + 1, (1,), generator=generator).item())
        segments.append(ClientSegment(client, start, steps, failed))
        start += steps
    if not segments:
        # nobody was sampled (Poisson sampling under client DP): one placeholder step runs and is
        # discarded; the round still releases the DP noise and is accounted
        segments.append(ClientSegment(0, 0, 1, failed=True, idle=True))
    return segments


class RoundLoader:
    """The batches of one round: each segment's client batches in turn (a sized iterable).

    A client with more steps than batches cycles its loader (a new pass reshuffles: the
    generator moves on). ``skip`` batches are left out at the start (resumed mid-round).
    """

    def __init__(self, segments: list[ClientSegment], loaders: dict[int, DataLoader], skip: int = 0) -> None:
        self.segments = segments
        self.loaders = loaders
        self.skip = skip  # batches already run before a mid-round checkpoint

    def __len__(self) -> int:
        return sum(s.steps for s in self.segments)

    # resumable (Lightning's `_Stateful`): the position within a round is restored by
    # FederatedSimulation from the checkpoint's loop progress, so there is nothing to carry here
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        for seg in self.segments:
            if seg.steps == 0:
                continue
            produced = 0
            while produced < seg.steps:
                for batch in self.loaders[seg.client]:
                    if seg.start + produced >= skip:
                        yield batch
                    produced += 1
                    if produced == seg.steps:
                        break
