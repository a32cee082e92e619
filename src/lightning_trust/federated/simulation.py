"""Mode 1: :class:`FederatedSimulation`, the in-process federated simulation of any LightningModule
as a drop-in callback: its arguments, client selection policy and Lightning hooks (one epoch is
one round, see :mod:`lightning_trust.federated`); rounds are planned in
:mod:`~lightning_trust.federated.rounds` and recorded in :mod:`~lightning_trust.federated.bookkeeping`.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_trust.demo import AdultDataModule, TabularMLP
    >>> simulation = FederatedSimulation(num_clients=10, clients_per_round=5, partition="dirichlet(0.5)",
    ...                                  aggregator="fedavg", local_steps=20)
    >>> trainer = pl.Trainer(max_epochs=20, callbacks=[simulation], logger=False, enable_progress_bar=False)
    >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
    >>> simulation.sample_rate, sorted(c.name for c in simulation.capabilities)
    (0.5, ['FEDERATED_ROUNDS', 'REPLACES_TRAIN_LOADER'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability
from lightning_trust.core.seam import restore_train_loader, swap_train_loader, train_loader_owner
from lightning_trust.federated.aggregators import Aggregator
from lightning_trust.federated.bookkeeping import (
    ClientTally,
    log_round,
    pick_byzantine,
    restore_simulation,
    round_record,
    scalar_val_metrics,
    sign_flipped,
    simulation_report,
    simulation_state,
    write_artifacts,
)
from lightning_trust.federated.dp import ClientDP
from lightning_trust.federated.metrics import SIMULATION_LOGGED_KEYS, SIMULATION_REPORT_KEYS
from lightning_trust.federated.partition import Partitioner, resolve_partition, split_clients
from lightning_trust.federated.payload import (
    Payload,
    base_fingerprint,
    check_base_unchanged,
    check_payload,
    load_payload,
    payload_bytes,
    payload_state,
    select_payload,
)
from lightning_trust.federated.rounds import (
    ClientSegment,
    RoundLoader,
    check_client_behaviour,
    check_round_config,
    check_round_size,
    check_selection,
    check_simulation_trainer,
    check_user_loader,
    client_loaders,
    client_sample_rate,
    client_steps,
    expected_clients,
    plan_segments,
)
from lightning_trust.federated.server import ClientUpdate, Server, add_proximal_grad, matches_any

__all__ = ["FederatedSimulation"]

State = dict[str, Tensor]

#: Why the simulation cannot train beside DP-SGD (the message keeps the fix).
PER_SAMPLE_DP_REASON = (
    "both choose the training batches (rounds of clients vs. Poisson samples of the whole dataset), and a "
    "per-sample guarantee over the pooled data would not describe the federated run. For client-level DP use "
    "`FederatedSimulation(client_dp=ClientDP(...))`"
)


class FederatedSimulation(TrustCallback):
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
        payload: what travels (:mod:`~lightning_trust.federated.payload`): ``"trainable"`` (default)
            the parameters with ``requires_grad`` and the buffers, so a frozen base (LoRA, PEFT) never
            leaves a client and the server holds only the adapters; ``"full"`` every tensor. Both
            are the same when nothing is frozen. Bytes up and down are measured each round.
        dropout_rate: probability that a sampled client fails mid-round; its update is lost and
            the round aggregates the others.
        seed: seed of the partition, the client sampler, client shuffling and failures.
        batch_keys: batch contract overrides (needed for ``by_key`` on tuple batches).
        log_clients: also log per-client training loss and sample counts each round.
        byzantine_fraction: share of clients (chosen once from ``seed``) that attack by sign
            flipping: they send ``w_global - byzantine_scale * (w - w_global)``. For robustness
            evaluation of aggregators; 0 = honest clients.
        byzantine_scale: magnitude of the flipped update.
        name: the report section (default ``"federated"``).

    Example:
        >>> simulation = FederatedSimulation(num_clients=10, partition="dirichlet(0.5)", aggregator="fedadam",
        ...                                  local_steps=10)
        >>> simulation.aggregator.name, simulation.expected_clients_per_round
        ('FedAdam', 10)
    """

    report_section = "federated"
    refuses: ClassVar[Mapping[Capability, str]] = {Capability.PER_SAMPLE_GRADIENTS: PER_SAMPLE_DP_REASON}
    logged_keys: ClassVar[dict[str, str]] = SIMULATION_LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = SIMULATION_REPORT_KEYS

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
        payload: Payload = "trainable",
        seed: int = 0,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        log_clients: bool = True,
        byzantine_fraction: float = 0.0,
        byzantine_scale: float = 1.0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        self.partitioner = resolve_partition(partition)
        check_round_config(num_clients, clients_per_round, local_steps, local_epochs, self.partitioner)
        check_client_behaviour(proximal_mu, dropout_rate, byzantine_fraction, byzantine_scale)
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
        check_round_size(self.server.aggregator, client_dp, num_clients, clients_per_round)
        self.payload = check_payload(payload)
        self._keys: list[str] = []  # the state-dict keys that travel this round
        self._payload_info: dict[str, int] = {}
        self._base = ""  # fingerprint of the frozen base (payload="trainable")

        self.round = 0  # completed rounds
        self.history: list[dict[str, Any]] = []
        self.partition_info: dict[str, Any] = {}
        self._sampler = torch.Generator().manual_seed(seed)
        self._parts: Optional[list[list[int]]] = None
        self._global: Optional[State] = None
        self._global_device: dict[str, Tensor] = {}
        self._local_states: dict[int, State] = {}
        self._param_keys: set[str] = set()
        self._segments: list[ClientSegment] = []
        self._plan_round = -1
        self._updates: list[ClientUpdate] = []
        self._tally = ClientTally()
        self._resume: Optional[dict[str, Any]] = None
        self._contract: Optional[BatchContract] = None
        self._figure: Optional[str] = None
        self._fit_trainer: Optional[pl.Trainer] = None
        self._user_reload = 0
        self._expected_sizes: Optional[list[int]] = None

    @property
    def capabilities(self) -> frozenset[Capability]:  # type: ignore[override]  # a ClassVar in the base; here it depends on proximal_mu
        """Trains in rounds on its own train loader; with FedProx it also edits the gradients."""
        declared = {Capability.FEDERATED_ROUNDS, Capability.REPLACES_TRAIN_LOADER}
        if self.proximal_mu:
            declared.add(Capability.EDITS_GRADIENTS)
        return frozenset(declared)

    @property
    def aggregator(self) -> Aggregator:
        return self.server.aggregator

    @property
    def sample_rate(self) -> float:
        """Expected share of clients per round."""
        return client_sample_rate(self.num_clients, self.clients_per_round)

    @property
    def expected_clients_per_round(self) -> Optional[int]:
        """Clients sampled per round (the expected number under Poisson sampling with client DP)."""
        return expected_clients(self.num_clients, self.clients_per_round)

    # policy ---------------------------------------------------------------------------------------
    def select_clients(self, round_index: int, num_clients: int, generator: torch.Generator) -> list[int]:
        """The clients (ids in ``range(num_clients)``) that train in round ``round_index`` (from 0),
        in the order they train.

        Default: ``expected_clients_per_round`` clients uniformly without replacement, sorted; with
        ``client_dp`` each client independently with probability ``sample_rate`` (Poisson sampling,
        which the accountant assumes: an override under ``client_dp`` voids the reported ε unless it
        samples the same way). Draw randomness only from ``generator``: it is checkpointed, so a
        resumed run selects the same clients.

        Example (every client in turn, ``clients_per_round`` at a time):
            >>> class RoundRobin(FederatedSimulation):
            ...     def select_clients(self, round_index, num_clients, generator):
            ...         k = self.expected_clients_per_round or num_clients
            ...         return [(round_index * k + i) % num_clients for i in range(k)]
            >>> RoundRobin(num_clients=5, clients_per_round=2).select_clients(2, 5, torch.Generator())
            [4, 0]
        """
        if self.client_dp is not None:  # Poisson sampling, as the accountant assumes
            mask = torch.rand(num_clients, generator=generator) < self.sample_rate
            return torch.nonzero(mask).flatten().tolist()
        k = self.expected_clients_per_round or num_clients
        return sorted(torch.randperm(num_clients, generator=generator)[:k].tolist())

    def _selected_clients(self) -> list[int]:
        n = len(self._parts or [])
        return check_selection(self.select_clients(self.round, n, self._sampler), n, self.round)

    # setup ----------------------------------------------------------------------------------------
    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """The simulation acts only while fitting, never during the sanity check."""
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._should_skip(trainer):
            return
        check_simulation_trainer(trainer)
        self._contract = BatchContract.resolve(self.batch_keys, trainer)
        self._fit_trainer = trainer
        if train_loader_owner(trainer) is not self:
            self._user_reload = trainer.reload_dataloaders_every_n_epochs  # type: ignore[attr-defined]  # set by Lightning's data connector
            swap_train_loader(trainer, self, self._round_loader)
        trainer.reload_dataloaders_every_n_epochs = 1  # type: ignore[attr-defined]  # each round has its own clients and length

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._select_payload(pl_module)
        if self._global is None:
            self._global = payload_state(pl_module, self._keys)
        elif not self._resume:  # resumed between rounds: the checkpoint's global weights
            load_payload(pl_module, self._global)
        # resumed within a round: the module holds the interrupted client's weights, restored by Lightning

    def _select_payload(self, pl_module: pl.LightningModule) -> None:
        """What travels this round (chosen at its first step: a callback may have unfrozen layers)."""
        self._keys, self._param_keys, self._payload_info = select_payload(
            pl_module, self.payload, self.server.keep_local, self._global
        )
        self._base = base_fingerprint(pl_module) if self.payload == "trainable" else ""

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._should_skip(trainer) and train_loader_owner(trainer) is self:
            restore_train_loader(trainer, self)
            trainer.reload_dataloaders_every_n_epochs = self._user_reload  # type: ignore[attr-defined]  # see setup
        self._fit_trainer = None

    # round planning ---------------------------------------------------------------------------------
    def _partition(self, user_loader: DataLoader) -> None:
        assert self._contract is not None
        self._parts, self.partition_info = split_clients(
            user_loader.dataset, self.partitioner, self.num_clients, self.seed, self._contract, self._expected_sizes
        )
        if self.num_clients is None:
            self.num_clients = len(self._parts)
            check_round_size(self.aggregator, self.client_dp, self.num_clients, self.clients_per_round)
        self.byzantine_clients = pick_byzantine(len(self._parts), self.byzantine_fraction, self.seed)

    def _round_loader(self, user_loader: Any) -> RoundLoader:
        """``wrap`` of the seam: this round's loader, from the user's loader Lightning just loaded."""
        user_loader = check_user_loader(user_loader)
        if self._parts is None:
            self._partition(user_loader)
        parts = self._parts
        assert parts is not None
        if self._plan_round != self.round:

            def steps_of(client: int) -> int:
                return client_steps(user_loader, parts[client], self.local_steps, self.local_epochs)

            self._segments = plan_segments(self._selected_clients(), steps_of, self.dropout_rate, self._sampler)
            self._plan_round = self.round
            if not self._resume:
                self._updates = []
        loaders = client_loaders(user_loader, parts, self._segments, self.seed, self.round)
        skip = 0
        if self._resume and self._fit_trainer is not None:  # resumed mid-round: skip the batches already run
            skip = self._fit_trainer.fit_loop.epoch_loop.batch_progress.current.ready
        self._resume = None
        return RoundLoader(self._segments, loaders, skip)

    # client lifecycle -------------------------------------------------------------------------------
    def _segment_at(self, batch_idx: int) -> Optional[ClientSegment]:
        return next((s for s in self._segments if s.start <= batch_idx < s.start + s.steps), None)

    def _begin_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seg: ClientSegment) -> None:
        assert self._global is not None
        if seg.start == 0:
            self._select_payload(pl_module)
        state = {k: self._global[k] for k in self._keys}
        state.update(self._local_states.get(seg.client, {}))
        load_payload(pl_module, state)
        for optimizer in trainer.optimizers:
            optimizer.state.clear()  # fresh local optimizer, as FedAvg/FedProx assume
        self._global_device = self._global_on(pl_module) if self.proximal_mu else {}
        self._tally = ClientTally()

    def _global_on(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        assert self._global is not None
        return {n: self._global[n].to(p.device) for n, p in pl_module.named_parameters() if n in self._global}

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seg = self._segment_at(batch_idx)
        if seg is not None and batch_idx == seg.start:
            self._begin_client(trainer, pl_module, seg)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.proximal_mu:
            return
        if not self._global_device and self._global is not None:  # resumed inside a client's steps
            self._global_device = self._global_on(pl_module)
        add_proximal_grad(pl_module, self._global_device, self.proximal_mu)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seg = self._segment_at(batch_idx)
        if seg is None:
            return
        self._tally.record(outputs, batch, self._contract)
        if batch_idx == seg.start + seg.steps - 1:
            self._end_client(pl_module, seg)
        if batch_idx == sum(s.steps for s in self._segments) - 1:
            self._close_round(pl_module)

    def _end_client(self, pl_module: pl.LightningModule, seg: ClientSegment) -> None:
        if seg.failed:
            return
        assert self._parts is not None
        state = payload_state(pl_module, self._keys)
        if seg.client in self.byzantine_clients and self._global is not None:
            state = sign_flipped(state, self._global, self._param_keys, self.byzantine_scale)
        if self.server.keep_local:  # FedBN: kept by the client, never sent
            self._local_states[seg.client] = {k: v for k, v in state.items() if matches_any(k, self.server.keep_local)}
            state = {k: v for k, v in state.items() if k not in self._local_states[seg.client]}
        self._updates.append(self._tally.update(seg.client, state, len(self._parts[seg.client])))

    def _close_round(self, pl_module: pl.LightningModule) -> None:
        assert self._global is not None
        expected = self.sample_rate * (self.num_clients or 1)
        sent = {k: self._global[k] for k in self._keys}
        new_global, metrics = self.server.aggregate(sent, self._updates, self._param_keys, expected)
        if self.client_dp is not None:
            self.client_dp.account(self.sample_rate)
            metrics["epsilon"] = self.client_dp.epsilon()
        metrics["bytes_up"] = float(sum(payload_bytes(u.state) for u in self._updates))
        metrics["bytes_down"] = float(sum(not s.idle for s in self._segments) * self._payload_info.get("bytes", 0))
        self._global.update(new_global)
        load_payload(pl_module, new_global)
        check_base_unchanged(pl_module, self._base)
        record = round_record(self.round + 1, self._updates, self._segments, metrics)
        self.history.append(record)
        self.round += 1
        self._updates = []
        log_round(pl_module, record, self.log_clients)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a round cut short (max_steps, an exception-free early stop) still ends on an aggregate
        if self._plan_round == self.round:
            self._close_round(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer) or not self.history:
            return
        self.history[-1]["val"] = scalar_val_metrics(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        figure = write_artifacts(trainer, self.report(), self.history, self.aggregator.name)
        if figure:
            self._figure = figure

    # checkpointing ----------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return simulation_state(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_simulation(self, state_dict)

    # report -----------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The federated section of the report (keys: :attr:`report_keys`)."""
        return simulation_report(self, self._figure)
