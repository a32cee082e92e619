"""Mode 3: Flower. Turn a LightningModule + DataModule (+ callbacks) into a Flower ``ClientApp``, and
our aggregators into a Flower server ``Strategy``, so the same code runs on Flower's simulation
engine or on a real SuperLink/SuperNodes deployment.

``flwr`` (extra ``lightning-trust[federated]``; ``flwr[simulation]`` for the Ray simulation) is
imported only when these functions are called.

Each ClientApp node finds its data from its node config: ``partition-id`` and
``num-partitions`` (set by Flower's simulation, or ``flower-supernode --node-config
"partition-id=0 num-partitions=2"``) select its share of the DataModule's training set with our
partitioners; a ``datamodule_fn`` that takes ``(partition_id, num_partitions)`` may load the node's
own data instead (``partition=None``).

Example (see ``examples/flower/``):
    >>> from lightning_trust.demo import AdultDataModule, TabularMLP
    >>> client = client_app(TabularMLP, AdultDataModule, partition="dirichlet(0.5)", local_steps=20)
    >>> server = server_app(TabularMLP, strategy=flower_strategy("fedadam"), num_rounds=10)
    >>> type(client).__name__, type(server).__name__
    ('ClientApp', 'ServerApp')
    >>> from flwr.simulation import run_simulation  # doctest: +SKIP
    >>> run_simulation(server_app=server, client_app=client, num_supernodes=4)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.compat import Capability
from lightning_trust.federated.aggregators import Aggregator, resolve_aggregator
from lightning_trust.federated.dp import ClientDP
from lightning_trust.federated.partition import Partitioner, resolve_partition
from lightning_trust.federated.payload import (
    Payload,
    base_fingerprint,
    check_fingerprint,
    check_payload,
    load_payload,
    payload_keys,
    payload_state,
    trainable_names,
)
from lightning_trust.federated.rounds import client_loader, client_seed
from lightning_trust.federated.server import ClientUpdate, Server, add_proximal_grad

__all__ = ["client_app", "evaluate_client", "flower_strategy", "server_app", "train_client"]

NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
FINGERPRINT = "base-fingerprint"  # the server's frozen base, in the train config


def _require_flwr() -> Any:
    try:
        import flwr
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "The Flower adapter needs Flower: `pip install 'lightning-trust[federated]'` (and `flwr[simulation]` "
            "for Flower's Ray simulation)."
        ) from err
    return flwr


class _Proximal(Callback):
    """FedProx inside a client's local Trainer: adds ``mu * (w - w_global)`` to the gradients."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EDITS_GRADIENTS})

    def __init__(self, reference: dict[str, Tensor], mu: float) -> None:
        self.reference, self.mu = reference, mu

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        add_proximal_grad(pl_module, self.reference, self.mu)


def _state_of(content: Any) -> dict[str, Tensor]:
    """The model weights a Flower message carries under ``"arrays"`` (an ``ArrayRecord``)."""
    return dict(content["arrays"].to_torch_state_dict())


def _quiet_trainer_kwargs(extra: Optional[dict[str, Any]]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(extra or {})
    return kwargs


def _client_data(
    datamodule_fn: Callable[..., pl.LightningDataModule],
    partition: Optional[Partitioner],
    partition_id: int,
    num_partitions: int,
    seed: int,
    batch_keys: Optional[dict[str, Union[str, int]]],
) -> tuple[pl.LightningDataModule, Any, Optional[list[int]]]:
    """The node's datamodule, the user's training loader and this node's indices (``None``: all)."""
    takes_ids = len(inspect.signature(datamodule_fn).parameters) >= 2
    dm = datamodule_fn(partition_id, num_partitions) if takes_ids else datamodule_fn()
    dm.setup(TrainerFn.FITTING)
    user_loader = dm.train_dataloader()
    if partition is None:
        return dm, user_loader, None
    contract = BatchContract.resolve(batch_keys, type("T", (), {"datamodule": dm})())
    parts = partition.split(user_loader.dataset, num_partitions, seed=seed, contract=contract)
    return dm, user_loader, parts[partition_id]


def train_client(
    module: pl.LightningModule,
    loader: Any,
    global_state: dict[str, Tensor],
    local_steps: Optional[int],
    local_epochs: int,
    proximal_mu: float = 0.0,
    callbacks: Optional[list[Callback]] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Tensor], Optional[float]]:
    """Local training of one client with a fresh Lightning Trainer (a fresh optimizer each round).

    ``global_state`` is the payload the server sent (all of it, or the trainable tensors and buffers,
    :mod:`~lightning_trust.federated.payload`); the reply holds the same keys after training.
    """
    load_payload(module, global_state, required=trainable_names(module))
    callbacks = list(callbacks or [])
    if proximal_mu:
        callbacks.append(_Proximal({k: v.clone() for k, v in global_state.items()}, proximal_mu))
    kwargs = {"limit_val_batches": 0, **_quiet_trainer_kwargs(trainer_kwargs)}
    kwargs.update({"max_steps": local_steps, "max_epochs": -1} if local_steps else {"max_epochs": local_epochs})
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(module, train_dataloaders=loader)
    loss = next((float(v) for k, v in trainer.callback_metrics.items() if "loss" in k and k.startswith("train")), None)
    return payload_state(module, global_state), loss


def evaluate_client(
    module: pl.LightningModule, datamodule: pl.LightningDataModule, trainer_kwargs: Optional[dict[str, Any]] = None
) -> dict[str, float]:
    """Validation metrics of ``module`` on the datamodule's validation set."""
    trainer = pl.Trainer(**_quiet_trainer_kwargs(trainer_kwargs))
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def client_app(
    module_fn: Callable[[], pl.LightningModule],
    datamodule_fn: Callable[..., pl.LightningDataModule],
    partition: Union[str, Partitioner, None] = "iid",
    local_steps: Optional[int] = None,
    local_epochs: int = 1,
    proximal_mu: float = 0.0,
    callbacks_fn: Optional[Callable[[], list[Callback]]] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    seed: int = 0,
    batch_keys: Optional[dict[str, Union[str, int]]] = None,
) -> Any:
    """A Flower ``ClientApp`` that trains ``module_fn()`` on this node's share of ``datamodule_fn()``.

    A train message carries the global weights (``"arrays"``: the payload :func:`server_app` chose)
    and a config (``"server-round"``, optionally ``"proximal-mu"``, ``"local-steps"`` and
    ``"base-fingerprint"``, which the node's frozen base must match); the reply carries the trained
    tensors of the payload and a MetricRecord with ``num-examples`` and ``train_loss``. An evaluate
    message runs ``trainer.validate`` on the node's validation data and replies with its metrics.
    """
    _require_flwr()
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    partitioner = resolve_partition(partition) if partition is not None else None
    app = ClientApp()
    cache: dict[tuple[int, int], tuple[pl.LightningDataModule, Any, Optional[list[int]]]] = {}

    def _data(pid: int, n: int, server_round: int) -> tuple[pl.LightningDataModule, Any, int]:
        if (pid, n) not in cache:  # once per node process: load and partition the data
            cache[(pid, n)] = _client_data(datamodule_fn, partitioner, pid, n, seed, batch_keys)
        dm, user_loader, indices = cache[(pid, n)]
        if indices is None:
            return dm, user_loader, len(user_loader.dataset)
        # the same client shuffling as FederatedSimulation's (round index from 0)
        gen = torch.Generator().manual_seed(client_seed(seed, server_round - 1, pid))
        return dm, client_loader(user_loader, indices, gen), len(indices)

    def _ids(context: Context) -> tuple[int, int]:
        cfg = context.node_config
        if "partition-id" not in cfg or "num-partitions" not in cfg:
            raise ValueError(
                "This node has no `partition-id`/`num-partitions` in its node config; start it with "
                '`flower-supernode --node-config "partition-id=0 num-partitions=2"` (the simulation sets them).'
            )
        return int(cfg["partition-id"]), int(cfg["num-partitions"])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid, n = _ids(context)
        config: Mapping[str, Any] = msg.content["config"] if "config" in msg.content.config_records else {}
        server_round = int(config.get("server-round", 1))
        steps = int(config["local-steps"]) if "local-steps" in config else local_steps
        mu = float(config.get("proximal-mu", proximal_mu))
        _, loader, num_examples = _data(pid, n, server_round)
        module = module_fn()
        check_fingerprint(module, str(config.get(FINGERPRINT, "")))
        global_state = _state_of(msg.content)
        state, loss = train_client(
            module,
            loader,
            global_state,
            steps,
            local_epochs,
            mu,
            callbacks_fn() if callbacks_fn else None,
            trainer_kwargs,
        )
        metrics: dict[str, Any] = {NUM_EXAMPLES: num_examples}
        if loss is not None:
            metrics["train_loss"] = loss
        content = RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid, n = _ids(context)
        dm, _, _ = _data(pid, n, 1)
        module = module_fn()
        load_payload(module, _state_of(msg.content))
        metrics = evaluate_client(module, dm, trainer_kwargs)
        size = len(dm.val_dataloader().dataset)
        record: dict[str, Any] = {k.replace("/", "_"): v for k, v in metrics.items()}
        record[NUM_EXAMPLES] = size
        return Message(content=RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)

    return app


def flower_strategy(
    aggregator: Union[str, Aggregator] = "fedavg",
    param_keys: Optional[Iterable[str]] = None,
    client_dp: Optional[ClientDP] = None,
    keep_local: Optional[Sequence[str]] = None,
    **fedavg_kwargs: Any,
) -> Any:
    """A Flower server ``Strategy`` (a subclass of Flower's message-API ``FedAvg``: same sampling,
    messaging and metric aggregation) whose ``aggregate_train`` uses our :class:`Server`: any of our
    aggregators, client-level DP, ``keep_local``, and the buffer rule.

    ``param_keys``: names of the model's parameters (the rest of the state dict are buffers);
    :func:`server_app` fills it from the module. ``fedavg_kwargs`` go to Flower's ``FedAvg``
    (``fraction_train``, ``min_train_nodes``...). With ``client_dp`` every node must train every
    round (``fraction_train=1``): Flower samples a fixed number of nodes, not Poisson. Krum and
    adaptive clipping are checked against ``min_train_nodes`` (set it to the number of nodes). Bytes
    up and down are measured per round from the messages' ``ArrayRecord`` s
    (``federated_bytes_up``/``federated_bytes_down`` in the train metrics and :attr:`history`).
    """
    _require_flwr()
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    rule = resolve_aggregator(aggregator)
    rule.check_clients(int(fedavg_kwargs.get("min_train_nodes", 2)), "min_train_nodes")
    if client_dp is not None:
        client_dp.check_clients(int(fedavg_kwargs.get("min_train_nodes", 2)))
    if client_dp is not None and float(fedavg_kwargs.get("fraction_train", 1.0)) != 1.0:
        raise ValueError(
            "Client-level DP with Flower needs every node in every round (`fraction_train=1.0`): Flower's node "
            "sampling is fixed-size, which the accountant's Poisson analysis does not cover."
        )

    class TrustStrategy(FlowerFedAvg):
        """Flower FedAvg whose aggregation is lightning-trust's :class:`Server`."""

        def __init__(self) -> None:
            super().__init__(**fedavg_kwargs)
            self.server = Server(rule, client_dp=client_dp, keep_local=keep_local)
            self.param_keys = set(param_keys) if param_keys is not None else None
            self.current: Optional[dict[str, Tensor]] = None
            self.history: list[dict[str, Any]] = []
            self._bytes_down = 0

        @override
        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            self.current = arrays.to_torch_state_dict()
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self._bytes_down = sum(_array_bytes(m) for m in messages)
            return messages

        @override
        def aggregate_train(self, server_round: int, replies: Any) -> tuple[Any, Any]:
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            if not valid and client_dp is None:
                return None, None
            assert self.current is not None
            updates: list[ClientUpdate] = []
            for msg in valid:
                metrics: Mapping[str, Any] = next(iter(msg.content.metric_records.values()))
                updates.append(ClientUpdate(len(updates), _state_of(msg.content), int(metrics[self.weighted_by_key])))
            keys = self.param_keys if self.param_keys is not None else set(self.current)
            new_state, stats = self.server.aggregate(self.current, updates, keys, expected_clients=len(valid) or 1)
            stats["bytes_up"] = float(sum(_array_bytes(m) for m in valid))
            stats["bytes_down"] = float(self._bytes_down)
            if client_dp is not None:
                client_dp.account(1.0)
                stats["epsilon"] = client_dp.epsilon()
            metrics_out = (
                self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
                if valid
                else MetricRecord()
            )
            for k, v in stats.items():
                metrics_out[f"federated_{k}"] = float(v)
            self.history.append({"round": server_round, **stats})
            return ArrayRecord.from_torch_state_dict(new_state), metrics_out

    return TrustStrategy()


def _array_bytes(message: Any) -> int:
    """Serialized bytes of a Flower message's arrays (what travels)."""
    return int(sum(record.count_bytes() for record in message.content.array_records.values()))


def server_app(
    module_fn: Callable[[], pl.LightningModule],
    strategy: Any = None,
    num_rounds: int = 3,
    train_config: Optional[dict[str, Any]] = None,
    evaluate_fn: Optional[Callable[[int, pl.LightningModule], dict[str, float]]] = None,
    on_result: Optional[Callable[[Any, pl.LightningModule], None]] = None,
    payload: Payload = "trainable",
) -> Any:
    """A Flower ``ServerApp`` that runs ``strategy`` (ours from :func:`flower_strategy`, default
    FedAvg, or any of Flower's own message-API strategies) from ``module_fn()``'s initial weights.

    ``evaluate_fn(round, module)`` evaluates the global model centrally each round;
    ``on_result(result, module)`` receives Flower's ``Result`` and the module holding the final
    global weights (to save it, say). ``payload="trainable"`` (default) sends only the parameters
    with ``requires_grad`` and the buffers, so a frozen base never travels (every node builds it
    with ``module_fn``; the train config carries its fingerprint, which each node checks);
    ``"full"`` sends every tensor.
    """
    check_payload(payload)
    if not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"`num_rounds` must be a positive integer, got {num_rounds!r}.")
    _require_flwr()
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        module = module_fn()
        chosen = strategy
        if chosen is None:
            chosen = flower_strategy("fedavg", param_keys=[n for n, _ in module.named_parameters()])
        elif getattr(chosen, "param_keys", ()) is None:
            chosen.param_keys = {n for n, _ in module.named_parameters()}
        keys = payload_keys(module, payload)
        config = dict(train_config or {})
        if payload == "trainable" and base_fingerprint(module):
            config[FINGERPRINT] = base_fingerprint(module)

        central = None
        if evaluate_fn is not None:

            def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                evaluated = module_fn()
                load_payload(evaluated, arrays.to_torch_state_dict())
                return MetricRecord(
                    {k.replace("/", "_"): float(v) for k, v in evaluate_fn(server_round, evaluated).items()}
                )

        result = chosen.start(
            grid=grid,
            initial_arrays=ArrayRecord.from_torch_state_dict(payload_state(module, keys)),
            num_rounds=num_rounds,
            train_config=ConfigRecord(config),
            evaluate_fn=central,
        )
        if result.arrays is not None and len(result.arrays):
            load_payload(module, result.arrays.to_torch_state_dict())
        if on_result is not None:
            on_result(result, module)

    return app
