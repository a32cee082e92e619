"""Mode 2: federated training across processes with Lightning's own launchers.

:class:`FederatedStrategy` is Lightning's DDP strategy without the DDP wrapper: each process is a
client (or silo) that trains on its own shard (the DistributedSampler's, or whatever its
DataModule loads for its rank) with no gradient all-reduce. Every ``local_steps`` optimizer steps
the processes exchange their weights over ``torch.distributed`` (one ``all_gather``, gloo on CPU,
nccl on GPUs) and every process computes the same aggregate with the chosen aggregator (robust
ones included), so the global model is identical everywhere. Pending local steps are also
aggregated before each validation and at the end of training, so validation and checkpoints see
the global model. Launch it like DDP: ``devices=N``, ``num_nodes``, SLURM or ``torchrun``; also
registered as ``Trainer(strategy="federated")``.

Every process must run the same number of training batches per epoch (aggregation is a
collective): Lightning's DistributedSampler guarantees it; a DataModule that loads per-rank data
itself must give every rank equally many batches.

Example:
    >>> import lightning.pytorch as pl
    >>> strategy = FederatedStrategy(local_steps=20, aggregator="fedavg")
    >>> trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=3, strategy=strategy, logger=False)
    >>> trainer.fit(TabularMLP(), AdultDataModule())  # doctest: +SKIP
    >>> sorted(c.name for c in strategy.state_callback.capabilities)
    ['FEDERATED_ROUNDS']
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, ClassVar, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_trust.core.batch import BatchContract
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability
from lightning_trust.federated.aggregators import Aggregator
from lightning_trust.federated.bookkeeping import count_samples
from lightning_trust.federated.dp import ClientDP
from lightning_trust.federated.metrics import STRATEGY_LOGGED_KEYS, STRATEGY_REPORT_KEYS
from lightning_trust.federated.payload import Payload, check_payload, load_payload, payload_keys
from lightning_trust.federated.server import ClientUpdate, Server, add_proximal_grad, matches_any

__all__ = ["FederatedStrategy"]

State = dict[str, Tensor]


def _attached_trainer(module: Optional[pl.LightningModule]) -> Optional[pl.Trainer]:
    """The Trainer ``module`` is attached to, or ``None`` (``module.trainer`` raises when there is none)."""
    if module is None:
        return None
    try:
        return module.trainer
    except RuntimeError:
        return None


class _StrategyState(TrustCallback):
    """The strategy's callback side: carries its federated state through checkpoints (strategies
    have no state hooks), aggregates pending steps before validation and at the end of training,
    and reports the ``federated`` section."""

    report_section = "federated"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.FEDERATED_ROUNDS})
    logged_keys: ClassVar[dict[str, str]] = STRATEGY_LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = STRATEGY_REPORT_KEYS

    def __init__(self, strategy: FederatedStrategy, name: Optional[str] = None) -> None:
        super().__init__(name=name)
        self.strategy = strategy

    @property
    @override
    def state_key(self) -> str:
        return "FederatedStrategy"

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """The strategy aggregates and records only while fitting."""
        return trainer.state.fn != TrainerFn.FITTING

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.strategy.fed_state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.strategy.load_fed_state_dict(state_dict)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip(trainer):
            self.strategy.aggregate_pending()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.strategy.aggregate_pending()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer) or trainer.sanity_checking or not self.strategy.history:
            return
        self.strategy.history[-1]["val"] = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val") and isinstance(v, Tensor) and v.numel() == 1
        }

    def report(self) -> dict[str, Any]:
        """The federated section of the report (keys: :attr:`report_keys`)."""
        return self.strategy.report()


class FederatedStrategy(DDPStrategy):
    """Each process a client; periodic aggregation over ``torch.distributed`` instead of gradient all-reduce.

    Args:
        local_steps: optimizer steps each process runs between aggregations (one round).
        aggregator: an aggregator name (``"fedavg"``, ``"fedadam"``, ``"median"``...) or instance.
        proximal_mu: FedProx coefficient added to the gradients before each step.
        client_dp: client-level DP (each process is a client, all take part every round).
        keep_local: parameter/buffer name patterns that stay on each process (FedBN).
        reset_optimizer: clear the local optimizer state after each aggregation.
        payload: ``"trainable"`` (default: the parameters with ``requires_grad`` and the buffers; a
            frozen base is never exchanged) or ``"full"`` (every tensor); see
            :mod:`~lightning_trust.federated.payload`.
        name: the report section of its state callback (default ``"federated"``).

    ``accelerator``, ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``,
    ``precision_plugin``, ``process_group_backend``, ``timeout`` and ``start_method`` are as for
    :class:`~lightning.pytorch.strategies.DDPStrategy`.

    The strategy adds its state callback (:attr:`state_callback`) to the Trainer: it checkpoints
    the federated state, aggregates before validation and reports.

    Example:
        >>> FederatedStrategy(local_steps=50, aggregator="trimmedmean").server.aggregator.name
        'TrimmedMean'
    """

    strategy_name = "federated"
    logged_keys: ClassVar[dict[str, str]] = STRATEGY_LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = STRATEGY_REPORT_KEYS

    def __init__(
        self,
        local_steps: int = 10,
        aggregator: Union[str, Aggregator] = "fedavg",
        proximal_mu: float = 0.0,
        client_dp: Optional[ClientDP] = None,
        keep_local: Optional[list[str]] = None,
        reset_optimizer: bool = True,
        payload: Payload = "trainable",
        accelerator: Optional[Any] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[Any] = None,
        checkpoint_io: Optional[Any] = None,
        precision_plugin: Optional[Any] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        name: Optional[str] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"`local_steps` must be a positive integer, got {local_steps!r}.")
        if not (isinstance(proximal_mu, (int, float)) and proximal_mu >= 0):
            raise ValueError(f"`proximal_mu` must be >= 0, got {proximal_mu!r}.")
        self.local_steps = local_steps
        self.proximal_mu = float(proximal_mu)
        self.reset_optimizer = reset_optimizer
        self.payload = check_payload(payload)
        self.server = Server(aggregator, client_dp=client_dp, keep_local=keep_local)
        self.client_dp = client_dp
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self._pending_steps = 0
        self._pending_samples = 0
        self._global: Optional[State] = None
        self._contract: Optional[BatchContract] = None
        self._state_callback = _StrategyState(self, name=name)

    @property
    def state_callback(self) -> TrustCallback:
        """The callback the strategy adds to the Trainer (state, aggregation before validation, report)."""
        return self._state_callback

    # no gradient all-reduce ---------------------------------------------------------------------
    @override
    def configure_ddp(self) -> None:
        """Leave the module unwrapped: gradients stay local to each process."""

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        self._contract = BatchContract.resolve(None, trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self.server.aggregator.check_clients(self.world_size, "devices x num_nodes")
            if self.client_dp is not None:
                self.client_dp.check_clients(self.world_size)
            self._broadcast_module()  # every client starts from rank 0's weights
            if self._global is None:
                self._global = self._snapshot()

    @override
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        trainer = _attached_trainer(model)
        callbacks: Optional[list[Any]] = getattr(trainer, "callbacks", None)  # set by Lightning's callback connector
        if callbacks is not None and self._state_callback not in callbacks:
            callbacks.append(self._state_callback)

    def _module(self) -> pl.LightningModule:
        module = self.lightning_module
        if module is None:
            raise RuntimeError("FederatedStrategy has no LightningModule yet: it is connected by `Trainer.fit`.")
        return module

    def _broadcast_module(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        with torch.no_grad():
            for tensor in self._module().state_dict().values():
                dist.broadcast(tensor, src=0)

    def _snapshot(self) -> State:
        state = self._module().state_dict()
        return {k: state[k].detach().clone().cpu() for k in payload_keys(self._module(), self.payload)}

    # local training ------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._pending_samples += count_samples(batch, self._contract)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Any] = None, **kwargs: Any
    ) -> Any:
        if self.proximal_mu and self._global is not None:
            closure = self._proximal(closure)
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._pending_steps += 1
        if self._pending_steps >= self.local_steps:
            self.aggregate_pending()
        return out

    def _proximal(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        module = self._module()
        assert self._global is not None
        reference = {n: self._global[n].to(p.device) for n, p in module.named_parameters() if n in self._global}

        def wrapped() -> Any:
            loss = closure()
            add_proximal_grad(module, reference, self.proximal_mu)
            return loss

        return wrapped

    # aggregation ---------------------------------------------------------------------------------
    def aggregate_pending(self) -> None:
        """Aggregate across processes now if any local step ran since the last aggregation."""
        # all ranks run the same number of steps (Lightning equalizes shard lengths), so this is collective-safe
        if self._pending_steps == 0 or self._global is None:
            return
        module = self._module()
        keys = payload_keys(module, self.payload)
        full = module.state_dict()
        state = {k: full[k].detach() for k in keys}
        flat = torch.cat(
            [state[k].double().flatten() for k in keys]
            + [torch.tensor([float(self._pending_samples)], dtype=torch.float64, device=self.root_device)]
        )
        gathered = self._all_gather(flat)
        exchanged = len(gathered) * flat.numel() * flat.element_size()
        updates = []
        for rank, row in enumerate(gathered):
            row = row.cpu()
            client_state, offset = {}, 0
            for k in keys:
                n = state[k].numel()
                client_state[k] = row[offset : offset + n].view(state[k].shape).to(state[k].dtype)
                offset += n
            updates.append(ClientUpdate(rank, client_state, max(int(row[-1].item()), 1)))
        param_keys = {n for n, _ in module.named_parameters()} & set(keys)
        sent = {k: self._global[k] if k in self._global else state[k].cpu().clone() for k in keys}
        new_global, metrics = self.server.aggregate(sent, updates, param_keys, expected_clients=len(updates))
        metrics["bytes_exchanged"] = float(exchanged)
        if self.client_dp is not None:
            self.client_dp.account(1.0)  # every process takes part in every round
            metrics["epsilon"] = self.client_dp.epsilon()
        self._global.update(new_global)
        load_payload(module, {k: v for k, v in new_global.items() if not matches_any(k, self.server.keep_local)})
        if self.reset_optimizer:
            for optimizer in self.optimizers:
                optimizer.state.clear()
        self.round += 1
        self.history.append(
            {
                "round": self.round,
                "steps": self._pending_steps,
                "client_samples": [u.num_samples for u in updates],
                **metrics,
            }
        )
        self._pending_steps = self._pending_samples = 0
        trainer = _attached_trainer(module)
        if trainer is not None and trainer.training:
            for key in ("update_norm_mean", "client_drift", "global_update_norm", "epsilon", "bytes_exchanged",
                        "clip_norm"):  # fmt: skip
                if key in metrics:
                    module.log(
                        f"federated/{key}",
                        float(metrics[key]),
                        on_step=True,
                        on_epoch=False,
                        batch_size=1,
                        rank_zero_only=True,
                    )
            module.log(
                "federated/round", float(self.round), on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True
            )

    def _all_gather(self, flat: Tensor) -> list[Tensor]:
        if not (dist.is_available() and dist.is_initialized()):
            return [flat]
        out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(out, flat)
        return out

    # checkpointing and report ----------------------------------------------------------------------
    def fed_state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "global": self._global,
            "server": self.server.state_dict(),
            "history": self.history,
            "pending_steps": self._pending_steps,
        }

    def load_fed_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self._global = state["global"]
        self.server.load_state_dict(state["server"])
        self.history = list(state.get("history", []))
        self._pending_steps = int(state.get("pending_steps", 0))

    def report(self) -> dict[str, Any]:
        """The federated section of the report (keys: :attr:`report_keys`)."""
        last_val: dict[str, float] = next((r["val"] for r in reversed(self.history) if "val" in r), {})
        out: dict[str, Any] = {
            "mode": "strategy",
            "rounds": self.round,
            "num_clients": self.world_size,
            "clients_per_round": self.world_size,
            "aggregator": self.server.aggregator.name,
            "aggregator_config": repr(self.server.aggregator),
            "local_steps": self.local_steps,
            "proximal_mu": self.proximal_mu,
            "keep_local": self.server.keep_local,
            "payload": self.payload,
            "final_val": last_val,
            "per_round": self.history,
        }
        if self.client_dp is not None:
            dp = self.client_dp.report()
            out.update({"epsilon": dp["epsilon"], "delta": dp["delta"], "client_dp": dp})
        return out


if "federated" not in StrategyRegistry:
    StrategyRegistry.register(
        "federated", FederatedStrategy, description="Federated averaging across processes (lightning-trust)"
    )
