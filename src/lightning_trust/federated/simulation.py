"""Mode 1: in-process federated simulation of any LightningModule, as a drop-in callback.

One Lightning epoch is one round. The callback partitions the dataset of the user's training
DataLoader into clients once and, each round, feeds Lightning a *round loader*: the batches of the
sampled clients one after another (client loaders mirror the user's: same batch size, collate
function, workers, ``drop_last``; shuffled when the user's loader shuffles). Lightning runs the
user's own ``training_step``, backward and optimizer from ``configure_optimizers`` (so precision,
gradient clipping and other callbacks apply unchanged). Around each client's batches the callback

* loads the current global weights (plus the client's ``keep_local`` entries) and clears the
  optimizer state, as FedAvg-style algorithms assume;
* adds the FedProx proximal gradient ``mu * (w - w_global)`` before each optimizer step (the
  user's loss is unchanged);
* after the client's last step, takes its weights as its update (or drops it when the client
  fails, ``dropout_rate``);

and after the round's last batch it aggregates (:class:`~lightning_trust.federated.server.Server`),
loads the new global weights, so Lightning's validation runs on the global model, and logs
``federated/*`` metrics. The state (round, global weights, server optimizer, client sampler RNG,
DP accountant, FedBN local weights, history) is checkpointed; resuming continues identically.

Example:
    >>> trainer = pl.Trainer(max_epochs=20, callbacks=[FederatedSimulation(num_clients=10, clients_per_round=5,
    ...                      partition="dirichlet(0.5)", aggregator="fedavg", local_steps=20)])
    >>> trainer.fit(TabularMLP(), AdultDataModule())
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource, _request_dataloader
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset

from lightning_trust.core.batch import BatchContract, batch_size_of
from lightning_trust.federated.aggregators import Aggregator
from lightning_trust.federated.dp import ClientDP
from lightning_trust.federated.partition import Partitioner, partition_summary, read_column, resolve_partition
from lightning_trust.federated.server import ClientUpdate, Server, add_proximal_grad, matches_any
from lightning_trust.core import artifact_dir, new_figure, save_figure, write_json

State = dict[str, Tensor]


@dataclass
class _Segment:
    client: int
    start: int  # first batch index of the round loader
    steps: int  # batches this client runs (fewer than planned when it fails)
    failed: bool
    idle: bool = False  # placeholder step of a round in which no client trains; its step is discarded


def client_loader(user_loader: DataLoader, indices: Sequence[int], generator: torch.Generator) -> DataLoader:
    """A DataLoader over ``indices`` of the user's dataset that mirrors the user's loader."""
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


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _RoundLoader:
    """The batches of one round: each sampled client's batches in turn (a sized iterable)."""

    def __init__(self, segments: list[_Segment], loaders: dict[int, DataLoader], skip: int = 0) -> None:
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
                for batch in self.loaders[seg.client]:  # a new pass reshuffles (the generator moves on)
                    if seg.start + produced >= skip:
                        yield batch
                    produced += 1
                    if produced == seg.steps:
                        break


class _RoundSource(_DataLoaderSource):
    """Where Lightning's fit loop gets its training batches: this round's loader, built from the
    user's own ``train_dataloader`` (requested through the original source each round)."""

    def __init__(self, callback: FederatedSimulation, original: _DataLoaderSource) -> None:
        super().__init__(None, original.name)
        self.callback = callback
        self.original = original

    def dataloader(self) -> _RoundLoader:
        return self.callback._round_loader(_request_dataloader(self.original))


class FederatedSimulation(Callback):
    """Simulate federated training of the Trainer's module on one machine; one epoch = one round.

    Args:
        num_clients: number of clients the training set is split into (``None`` with ``by_key``:
            one client per value).
        clients_per_round: clients sampled each round: an int count, or a float fraction in
            ``(0, 1]``; ``None`` = all. With ``client_dp`` clients are Poisson-sampled at rate
            ``clients_per_round / num_clients`` (what the accountant assumes).
        local_steps: optimizer steps each client runs per round (cycling its data as needed).
        local_epochs: passes over its data each client runs per round (when ``local_steps`` is None;
            default 1).
        partition: ``"iid"``, ``"dirichlet(<alpha>)"``, ``"by_key(<side column>)"`` or a
            :class:`~lightning_trust.federated.partition.Partitioner`.
        aggregator: ``"fedavg"``, ``"fedavgm"``, ``"fedadam"``, ``"fedyogi"``, ``"fedadagrad"``,
            ``"median"``, ``"trimmedmean"``, ``"krum"``, ``"multikrum"`` or an Aggregator instance.
        proximal_mu: FedProx coefficient (0 = FedAvg's local objective).
        client_dp: client-level DP (:class:`~lightning_trust.federated.dp.ClientDP`); ε is logged
            as ``federated/epsilon``.
        keep_local: names (patterns) of parameters/buffers that never leave a client (FedBN).
        dropout_rate: probability that a sampled client fails mid-round; its update is lost and
            the round aggregates the others.
        seed: seed of the partition, the client sampler, client shuffling and failures.
        batch_keys: batch contract overrides (needed for ``by_key`` on tuple batches).
        log_clients: also log per-client training loss and sample counts each round.
        byzantine_fraction: share of clients (chosen once from ``seed``) that attack by sign
            flipping: they send ``w_global - byzantine_scale * (w - w_global)``. For robustness
            evaluation of aggregators; 0 = honest clients.
        byzantine_scale: magnitude of the flipped update.

    Example:
        >>> FederatedSimulation(num_clients=10, partition="dirichlet(0.5)", aggregator="fedadam", local_steps=10)
    """

    report_section = "federated"

    def __init__(
        self,
        num_clients: Optional[int] = 10,
        clients_per_round: Optional[Union[int, float]] = None,
        local_steps: Optional[int] = None,
        local_epochs: Optional[int] = None,
        partition: Union[str, Partitioner] = "iid",
        aggregator: Union[str, Aggregator] = "fedavg",
        proximal_mu: float = 0.0,
        client_dp: Optional[ClientDP] = None,
        keep_local: Optional[list[str]] = None,
        dropout_rate: float = 0.0,
        seed: int = 0,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        log_clients: bool = True,
        byzantine_fraction: float = 0.0,
        byzantine_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.partitioner = resolve_partition(partition)
        if num_clients is None and not self.partitioner.infers_num_clients:
            raise ValueError(f"`num_clients` is required with partition {self.partitioner!r}.")
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
                raise ValueError(f"`clients_per_round` ({clients_per_round}) exceeds `num_clients` ({num_clients}).")
        if local_steps is not None and local_epochs is not None:
            raise ValueError("Set either `local_steps` or `local_epochs`, not both.")
        for name, value in (("local_steps", local_steps), ("local_epochs", local_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not (isinstance(proximal_mu, (int, float)) and proximal_mu >= 0):
            raise ValueError(f"`proximal_mu` must be >= 0, got {proximal_mu!r}.")
        if not (isinstance(dropout_rate, (int, float)) and 0.0 <= dropout_rate < 1.0):
            raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate!r}.")
        if not (isinstance(byzantine_fraction, (int, float)) and 0.0 <= byzantine_fraction < 1.0):
            raise ValueError(f"`byzantine_fraction` must be in [0, 1), got {byzantine_fraction!r}.")
        if not (isinstance(byzantine_scale, (int, float)) and byzantine_scale > 0):
            raise ValueError(f"`byzantine_scale` must be > 0, got {byzantine_scale!r}.")
        self.byzantine_fraction = float(byzantine_fraction)
        self.byzantine_scale = float(byzantine_scale)
        self.byzantine_clients: list[int] = []
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.local_steps = local_steps
        self.local_epochs = local_epochs if local_epochs is not None else (None if local_steps else 1)
        self.proximal_mu = float(proximal_mu)
        self.dropout_rate = float(dropout_rate)
        self.seed = seed
        self.batch_keys = batch_keys
        self.log_clients = log_clients
        self.server = Server(aggregator, client_dp=client_dp, keep_local=keep_local)
        self.client_dp = client_dp

        self.round = 0  # completed rounds
        self.history: list[dict[str, Any]] = []
        self.partition_info: dict[str, Any] = {}
        self._sampler = torch.Generator().manual_seed(seed)
        self._parts: Optional[list[list[int]]] = None
        self._global: Optional[State] = None
        self._global_device: dict[str, Tensor] = {}
        self._local_states: dict[int, State] = {}
        self._param_keys: set[str] = set()
        self._segments: list[_Segment] = []
        self._plan_round = -1
        self._updates: list[ClientUpdate] = []
        self._loss_sum: Optional[Tensor] = None
        self._loss_count = 0
        self._samples_seen = 0
        self._resume: Optional[dict[str, Any]] = None
        self._contract: Optional[BatchContract] = None
        self._figure: Optional[str] = None
        self._module: Optional[pl.LightningModule] = None
        self._user_reload = 0
        self._expected_sizes: Optional[list[int]] = None

    # setup ----------------------------------------------------------------------------------
    @property
    def aggregator(self) -> Aggregator:
        return self.server.aggregator

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
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
        if any(type(cb).__name__ == "DifferentialPrivacy" for cb in trainer.callbacks):
            raise ValueError(
                "FederatedSimulation cannot run with the DifferentialPrivacy (DP-SGD) callback: both choose the "
                "training batches (rounds of clients vs. Poisson samples of the whole dataset), and a per-sample "
                "guarantee over the pooled data would not describe the federated run. For client-level DP use "
                "`FederatedSimulation(client_dp=ClientDP(...))`."
            )
        self._contract = BatchContract.resolve(self.batch_keys, trainer)
        self._param_keys = {name for name, _ in pl_module.named_parameters()}
        self._module = pl_module
        source = trainer.fit_loop._data_source
        if not isinstance(source, _RoundSource):
            trainer.fit_loop._data_source = _RoundSource(self, source)
            self._user_reload = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1  # each round has its own clients and length

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._global is None:
            self._global = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}
        elif not self._resume:  # resumed between rounds: the checkpoint's global weights
            self._load(pl_module, self._global)
        # resumed within a round: the module holds the interrupted client's weights, restored by Lightning

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        source = trainer.fit_loop._data_source
        if stage == "fit" and isinstance(source, _RoundSource) and source.callback is self:
            trainer.fit_loop._data_source = source.original
            trainer.reload_dataloaders_every_n_epochs = self._user_reload

    # round planning ---------------------------------------------------------------------------
    def _partition(self, user_loader: Any) -> None:
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
        assert self._contract is not None
        self._parts = self.partitioner.split(dataset, self.num_clients, seed=self.seed, contract=self._contract)
        if self.num_clients is None:
            self.num_clients = len(self._parts)
        sizes = [len(p) for p in self._parts]
        if self._expected_sizes is not None and sizes != self._expected_sizes:
            raise RuntimeError(
                f"The checkpoint was trained on client partitions of sizes {self._expected_sizes}, but the data now "
                f"partitions into {sizes}: resume with the same dataset, partition, num_clients and seed."
            )
        n_bad = int(round(self.byzantine_fraction * len(self._parts)))
        if n_bad:
            perm = torch.randperm(len(self._parts), generator=torch.Generator().manual_seed(_seed(self.seed, 7919)))
            self.byzantine_clients = sorted(perm[:n_bad].tolist())
        if any(len(p) == 0 for p in self._parts):
            empty = [i for i, p in enumerate(self._parts) if not p]
            raise ValueError(f"Clients {empty} got no samples from {self.partitioner!r}; use fewer clients.")
        try:
            labels = read_column(dataset, self._contract, "target")
        except (KeyError, TypeError, ValueError, RuntimeError):
            labels = None
        self.partition_info = {
            "partition": repr(self.partitioner),
            **partition_summary(self._parts, labels, self.partitioner.client_names()),
        }

    @property
    def sample_rate(self) -> float:
        """Expected share of clients per round."""
        n = self.num_clients or 1
        if self.clients_per_round is None:
            return 1.0
        if isinstance(self.clients_per_round, float):
            return float(self.clients_per_round)
        return min(self.clients_per_round / n, 1.0)

    @property
    def expected_clients_per_round(self) -> Optional[int]:
        """Clients sampled per round (the expected number under Poisson sampling with client DP)."""
        if self.num_clients is None:
            return None
        if self.clients_per_round is None:
            return self.num_clients
        if isinstance(self.clients_per_round, float):
            return max(1, round(self.clients_per_round * self.num_clients))
        return min(self.clients_per_round, self.num_clients)

    def _sample_clients(self) -> list[int]:
        n = len(self._parts or [])
        if self.client_dp is not None:  # Poisson sampling, as the accountant assumes
            mask = torch.rand(n, generator=self._sampler) < self.sample_rate
            return torch.nonzero(mask).flatten().tolist()
        k = self.expected_clients_per_round or n
        return sorted(torch.randperm(n, generator=self._sampler)[:k].tolist())

    def _round_loader(self, user_loader: Any) -> _RoundLoader:
        if self._parts is None:
            self._partition(user_loader)
        assert self._parts is not None
        loaders = {}
        if self._plan_round != self.round:
            clients = self._sample_clients()
            segments, start = [], 0
            for c in clients:
                steps = self.local_steps or self.local_epochs * len(client_loader(user_loader, self._parts[c], torch.Generator()))
                failed = bool(torch.rand(1, generator=self._sampler).item() < self.dropout_rate)
                if failed:  # fails somewhere in the round, after at least one step of work
                    steps = int(torch.randint(1, steps + 1, (1,), generator=self._sampler).item())
                segments.append(_Segment(c, start, steps, failed))
                start += steps
            if not segments:
                # nobody was sampled (Poisson sampling under client DP): Lightning needs a batch to run
                # the epoch, so one placeholder step runs and is discarded; the round still releases
                # the DP noise and is accounted
                segments.append(_Segment(0, 0, 1, failed=True, idle=True))
            self._segments, self._plan_round = segments, self.round
            if not self._resume:
                self._updates = []
        for seg in self._segments:
            gen = torch.Generator().manual_seed(_seed(self.seed, self.round, seg.client))
            loaders[seg.client] = client_loader(user_loader, self._parts[seg.client], gen)
        skip = 0
        if self._resume and self._module is not None:  # resumed mid-round: skip the batches already run
            skip = self._module.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        self._resume = None
        return _RoundLoader(self._segments, loaders, skip)

    # client lifecycle ---------------------------------------------------------------------------
    def _segment_at(self, batch_idx: int) -> Optional[_Segment]:
        for seg in self._segments:
            if seg.start <= batch_idx < seg.start + seg.steps:
                return seg
        return None

    def _load(self, pl_module: pl.LightningModule, state: State) -> None:
        pl_module.load_state_dict(state, strict=True)

    def _begin_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seg: _Segment) -> None:
        assert self._global is not None
        state = dict(self._global)
        state.update(self._local_states.get(seg.client, {}))
        self._load(pl_module, state)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()  # fresh local optimizer, as FedAvg/FedProx assume
        self._global_device = {
            name: self._global[name].to(p.device) for name, p in pl_module.named_parameters() if name in self._global
        } if self.proximal_mu else {}
        self._loss_sum, self._loss_count, self._samples_seen = None, 0, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seg = self._segment_at(batch_idx)
        if seg is not None and batch_idx == seg.start:
            self._begin_client(trainer, pl_module, seg)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.proximal_mu:
            return
        if not self._global_device and self._global is not None:  # resumed inside a client's steps
            self._global_device = {n: self._global[n].to(p.device) for n, p in pl_module.named_parameters()}
        add_proximal_grad(pl_module, self._global_device, self.proximal_mu)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seg = self._segment_at(batch_idx)
        if seg is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        self._samples_seen += batch_size_of(batch, self._contract) or 0
        if batch_idx == seg.start + seg.steps - 1:
            self._end_client(pl_module, seg)
        if batch_idx == sum(s.steps for s in self._segments) - 1:
            self._close_round(pl_module)

    def _end_client(self, pl_module: pl.LightningModule, seg: _Segment) -> None:
        if seg.failed:
            return
        assert self._parts is not None
        state = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}
        if seg.client in self.byzantine_clients and self._global is not None:  # sign-flipping attacker
            for k in self._param_keys:
                g = self._global[k]
                state[k] = (g.double() - self.byzantine_scale * (state[k].double() - g.double())).to(g.dtype)
        if self.server.keep_local:
            self._local_states[seg.client] = {k: v for k, v in state.items() if matches_any(k, self.server.keep_local)}
        loss = float(self._loss_sum / self._loss_count) if self._loss_sum is not None and self._loss_count else None
        self._updates.append(
            ClientUpdate(seg.client, state, len(self._parts[seg.client]), loss, {"samples_seen": self._samples_seen})
        )

    def _close_round(self, pl_module: pl.LightningModule) -> None:
        assert self._global is not None
        expected = self.sample_rate * (self.num_clients or 1)
        new_global, metrics = self.server.aggregate(self._global, self._updates, self._param_keys, expected)
        if self.client_dp is not None:
            self.client_dp.account(self.sample_rate)
            metrics["epsilon"] = self.client_dp.epsilon()
        self._global = new_global
        self._load(pl_module, new_global)
        losses = [u.loss for u in self._updates if u.loss is not None]
        record: dict[str, Any] = {
            "round": self.round + 1,
            "clients": [u.client_id for u in self._updates],
            "failed": [seg.client for seg in self._segments if seg.failed and not seg.idle],
            "client_loss": {str(u.client_id): u.loss for u in self._updates},
            "client_samples": {str(u.client_id): u.metrics.get("samples_seen", 0) for u in self._updates},
            "client_steps": {str(seg.client): seg.steps for seg in self._segments if not seg.idle},
            **metrics,
        }
        if losses:
            record["train_loss_mean"] = sum(losses) / len(losses)
        self.history.append(record)
        self.round += 1
        self._updates = []
        self._log_round(pl_module, record)

    def _log_round(self, pl_module: pl.LightningModule, record: dict[str, Any]) -> None:
        scalars = {"round": float(record["round"]), "clients_failed": float(len(record["failed"]))}
        for key in ("clients_aggregated", "update_norm_mean", "client_drift", "global_update_norm", "epsilon",
                    "train_loss_mean"):  # fmt: skip
            if key in record:
                scalars[key] = float(record[key])
        for key, value in scalars.items():
            pl_module.log(f"federated/{key}", value, on_step=False, on_epoch=True, batch_size=1)
        if self.log_clients:
            self._log_clients(pl_module.trainer, record)

    @rank_zero_only
    def _log_clients(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        metrics: dict[str, float] = {}
        for cid, loss in record["client_loss"].items():
            if loss is not None:
                metrics[f"federated/client_{cid}/train_loss"] = loss
            metrics[f"federated/client_{cid}/samples"] = float(record["client_samples"][cid])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a round cut short (max_steps, an exception-free early stop) still ends on an aggregate
        if self._plan_round == self.round:
            self._close_round(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.history or trainer.state.fn != "fit":
            return
        values = {
            k: float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith("val") and isinstance(v, Tensor) and v.numel() == 1
        }
        self.history[-1]["val"] = values

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_artifacts(trainer)

    @rank_zero_only
    def _write_artifacts(self, trainer: pl.Trainer) -> None:
        folder = artifact_dir(trainer, "federated")
        write_json(folder / "simulation.json", self.report())
        curves: dict[str, list[tuple[int, float]]] = {}
        for record in self.history:
            for k, v in record.get("val", {}).items():
                curves.setdefault(k, []).append((record["round"], v))
        if curves:
            fig = new_figure(figsize=(5, 3.2))
            ax = fig.add_subplot(1, 1, 1)
            for name, points in curves.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            ax.set_xlabel("round")
            ax.set_title(f"Global model, {self.aggregator.name}")
            ax.legend()
            path = folder / "rounds.png"
            save_figure(trainer, fig, path, tag="federated/rounds")
            self._figure = str(path)

    # checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "round": self.round,
            "global": self._global,
            "server": self.server.state_dict(),
            "sampler": self._sampler.get_state(),
            "local_states": self._local_states,
            "history": self.history,
            "num_clients": self.num_clients,
            "partition_sizes": [len(p) for p in self._parts] if self._parts is not None else None,
        }
        if self._plan_round == self.round and self._segments and self._updates_in_flight():
            # saved mid-round: the plan and finished clients, so the round resumes where it stopped
            state["in_round"] = {
                "segments": [vars(s).copy() for s in self._segments],
                "updates": [vars(u).copy() for u in self._updates],
            }
        return state

    def _updates_in_flight(self) -> bool:
        trainer = getattr(self._module, "_trainer", None)
        if trainer is None:
            return False
        position = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return 0 < position < sum(s.steps for s in self._segments)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict["round"])
        self._global = state_dict["global"]
        self.server.load_state_dict(state_dict["server"])
        self._sampler.set_state(state_dict["sampler"])
        self._local_states = state_dict.get("local_states", {})
        self.history = list(state_dict.get("history", []))
        self.num_clients = state_dict.get("num_clients", self.num_clients)
        self._expected_sizes = state_dict.get("partition_sizes")
        in_round = state_dict.get("in_round")
        if in_round:
            self._segments = [_Segment(**s) for s in in_round["segments"]]
            self._updates = [ClientUpdate(**u) for u in in_round["updates"]]
            self._plan_round = self.round
            self._resume = {"in_round": True}

    # report -------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        last_val = next((r["val"] for r in reversed(self.history) if "val" in r), {})
        out: dict[str, Any] = {
            "mode": "simulation",
            "rounds": self.round,
            "num_clients": self.num_clients,
            "clients_per_round": self.expected_clients_per_round,
            "sample_rate": self.sample_rate,
            "aggregator": self.aggregator.name,
            "aggregator_config": repr(self.aggregator),
            "local_steps": self.local_steps,
            "local_epochs": self.local_epochs,
            "proximal_mu": self.proximal_mu,
            "dropout_rate": self.dropout_rate,
            "byzantine_clients": self.byzantine_clients,
            "keep_local": self.server.keep_local,
            "partition": self.partition_info,
            "final_val": last_val,
            "per_round": self.history,
        }
        if self.client_dp is not None:
            dp = self.client_dp.report()
            out.update({"epsilon": dp["epsilon"], "delta": dp["delta"], "client_dp": dp})
        if self._figure:
            out["figures"] = {"rounds": self._figure}
        return out
