"""The bookkeeping of a simulated round (:class:`~lightning_trust.federated.FederatedSimulation`):
a client's tally of losses and samples, the update it sends (sign-flipped by a byzantine
attacker), the round's record, what is logged once per round, the checkpoint state, the report
section and the artifacts (``simulation.json``, the ``rounds.png`` curves of the global model).

Example:
    >>> import torch
    >>> from lightning_trust.federated.rounds import ClientSegment
    >>> tally = ClientTally()
    >>> tally.record({"loss": torch.tensor(0.5)}, (torch.zeros(4, 2), torch.zeros(4)), contract=None)
    >>> tally.record(torch.tensor(0.25), (torch.zeros(4, 2), torch.zeros(4)), contract=None)
    >>> tally.mean_loss(), tally.samples
    (0.375, 8)
    >>> update = tally.update(3, {}, num_samples=40)
    >>> update.loss, update.metrics
    (0.375, {'samples_seen': 8})
    >>> record = round_record(1, [update], [ClientSegment(3, 0, 2, failed=False)], {"clients_aggregated": 1})
    >>> record["clients"], record["client_steps"], record["train_loss_mean"]
    ([3], {'3': 2}, 0.375)
    >>> sign_flipped({"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}, {"w"}, scale=1.0)["w"]
    tensor([0.])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from lightning_trust.core import artifact_dir, new_figure, save_figure, write_json
from lightning_trust.core.batch import BatchContract, BatchKeyError, batch_size_of
from lightning_trust.core.tensors import first_tensor
from lightning_trust.federated.rounds import ClientSegment, client_seed
from lightning_trust.federated.server import ClientUpdate

if TYPE_CHECKING:
    from lightning_trust.federated.simulation import FederatedSimulation

__all__ = [
    "ROUND_SCALARS",
    "ClientTally",
    "count_samples",
    "log_round",
    "payload_report",
    "pick_byzantine",
    "restore_simulation",
    "round_record",
    "scalar_val_metrics",
    "sign_flipped",
    "simulation_report",
    "simulation_state",
    "write_artifacts",
]

State = dict[str, Tensor]

#: The scalars logged once per round (``federated/<key>``) when the round has them.
ROUND_SCALARS = (
    "clients_aggregated", "update_norm_mean", "client_drift", "global_update_norm", "epsilon", "train_loss_mean",
    "bytes_up", "bytes_down", "clip_norm", "unclipped_fraction",
)  # fmt: skip


def count_samples(batch: Any, contract: Optional[BatchContract]) -> int:
    """Samples in a training batch: the leading size of its inputs as the contract reads them, else
    (a dict batch whose inputs the contract cannot name, e.g. a ``forward(batch)`` module) of its
    target, else of its first tensor; 0 for a batch without tensors. Counting never stops training.

    Example:
        >>> count_samples({"tokens": torch.zeros(3, 5), "label": torch.zeros(3)}, BatchContract())
        3
    """
    size = batch_size_of(batch, contract, missing_ok=True)
    if size is not None:
        return size
    contract = contract or BatchContract()
    try:
        target = first_tensor(contract.target(batch), min_ndim=1)
    except BatchKeyError:
        target = None
    found = target if target is not None else first_tensor(batch, min_ndim=1)
    return int(found.shape[0]) if found is not None else 0


class ClientTally:
    """A client's training losses and samples over its steps of a round."""

    def __init__(self) -> None:
        self.loss_sum: Optional[Tensor] = None
        self.loss_count = 0
        self.samples = 0

    def record(self, outputs: Any, batch: Any, contract: Optional[BatchContract]) -> None:
        """One training step: its loss (``training_step``'s output) and batch size."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.loss_count += 1
        self.samples += count_samples(batch, contract)

    def mean_loss(self) -> Optional[float]:
        """The mean training loss of the client's steps (``None`` without losses)."""
        return float(self.loss_sum / self.loss_count) if self.loss_sum is not None and self.loss_count else None

    def update(self, client: int, state: State, num_samples: int) -> ClientUpdate:
        """The client's update: its weights ``state``, its share's size, mean loss and samples seen."""
        return ClientUpdate(client, state, num_samples, self.mean_loss(), {"samples_seen": self.samples})


def pick_byzantine(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The attacking clients: ``round(fraction * num_clients)`` of them, chosen once from ``seed``."""
    n_bad = round(fraction * num_clients)
    if not n_bad:
        return []
    perm = torch.randperm(num_clients, generator=torch.Generator().manual_seed(client_seed(seed, 7919)))
    return sorted(perm[:n_bad].tolist())


def sign_flipped(state: State, global_state: State, param_keys: Iterable[str], scale: float) -> State:
    """A sign-flipping attacker's update: ``w_global - scale * (w - w_global)`` for each parameter."""
    for k in param_keys:
        g = global_state[k]
        state[k] = (g.double() - scale * (state[k].double() - g.double())).to(g.dtype)
    return state


def round_record(
    round_number: int, updates: list[ClientUpdate], segments: list[ClientSegment], metrics: dict[str, Any]
) -> dict[str, Any]:
    """The history record of round ``round_number`` (from 1): clients, failures, losses, samples,
    steps and the aggregation ``metrics``."""
    losses = [u.loss for u in updates if u.loss is not None]
    record: dict[str, Any] = {
        "round": round_number,
        "clients": [u.client_id for u in updates],
        "failed": [seg.client for seg in segments if seg.failed and not seg.idle],
        "client_loss": {str(u.client_id): u.loss for u in updates},
        "client_samples": {str(u.client_id): u.metrics.get("samples_seen", 0) for u in updates},
        "client_steps": {str(seg.client): seg.steps for seg in segments if not seg.idle},
        **metrics,
    }
    if losses:
        record["train_loss_mean"] = sum(losses) / len(losses)
    return record


def log_round(pl_module: pl.LightningModule, record: dict[str, Any], log_clients: bool) -> None:
    """Log the round's ``federated/*`` scalars (and, with ``log_clients``, each client's)."""
    scalars = {"round": float(record["round"]), "clients_failed": float(len(record["failed"]))}
    scalars.update({key: float(record[key]) for key in ROUND_SCALARS if key in record})
    for key, value in scalars.items():
        pl_module.log(f"federated/{key}", value, on_step=False, on_epoch=True, batch_size=1)
    if log_clients:
        _log_clients(pl_module.trainer, record)


@rank_zero_only
def _log_clients(trainer: pl.Trainer, record: dict[str, Any]) -> None:
    metrics: dict[str, float] = {}
    for cid, loss in record["client_loss"].items():
        if loss is not None:
            metrics[f"federated/client_{cid}/train_loss"] = loss
        metrics[f"federated/client_{cid}/samples"] = float(record["client_samples"][cid])
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def scalar_val_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The Trainer's scalar ``val*`` metrics (the global model's, after a round)."""
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith("val") and isinstance(v, Tensor) and v.numel() == 1
    }


def simulation_state(sim: FederatedSimulation) -> dict[str, Any]:
    """The simulation's checkpoint state: round, global weights, server, client sampler, FedBN local
    weights, history and, saved mid-round, the round's plan and finished clients."""
    state: dict[str, Any] = {
        "round": sim.round,
        "global": sim._global,
        "server": sim.server.state_dict(),
        "sampler": sim._sampler.get_state(),
        "local_states": sim._local_states,
        "history": sim.history,
        "num_clients": sim.num_clients,
        "partition_sizes": [len(p) for p in sim._parts] if sim._parts is not None else None,
    }
    if sim._plan_round == sim.round and sim._segments and _updates_in_flight(sim):
        # saved mid-round: the plan and finished clients, so the round resumes where it stopped
        state["in_round"] = {
            "segments": [vars(s).copy() for s in sim._segments],
            "updates": [vars(u).copy() for u in sim._updates],
        }
    return state


def _updates_in_flight(sim: FederatedSimulation) -> bool:
    if sim._fit_trainer is None:
        return False
    position = sim._fit_trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return 0 < position < sum(s.steps for s in sim._segments)


def restore_simulation(sim: FederatedSimulation, state_dict: dict[str, Any]) -> None:
    """Continue from :func:`simulation_state` (between rounds, or within the saved round)."""
    sim.round = int(state_dict["round"])
    sim._global = state_dict["global"]
    sim.server.load_state_dict(state_dict["server"])
    sim._sampler.set_state(state_dict["sampler"])
    sim._local_states = state_dict.get("local_states", {})
    sim.history = list(state_dict.get("history", []))
    sim.num_clients = state_dict.get("num_clients", sim.num_clients)
    sim._expected_sizes = state_dict.get("partition_sizes")
    in_round = state_dict.get("in_round")
    if in_round:
        sim._segments = [ClientSegment(**s) for s in in_round["segments"]]
        sim._updates = [ClientUpdate(**u) for u in in_round["updates"]]
        sim._plan_round = sim.round
        sim._resume = {"in_round": True}


def simulation_report(sim: FederatedSimulation, figure: Optional[str]) -> dict[str, Any]:
    """The federated section of the report (keys: ``SIMULATION_REPORT_KEYS``, and ``figures``)."""
    last_val: dict[str, float] = next((r["val"] for r in reversed(sim.history) if "val" in r), {})
    out: dict[str, Any] = {
        "mode": "simulation",
        "rounds": sim.round,
        "num_clients": sim.num_clients,
        "clients_per_round": sim.expected_clients_per_round,
        "sample_rate": sim.sample_rate,
        "aggregator": sim.aggregator.name,
        "aggregator_config": repr(sim.aggregator),
        "local_steps": sim.local_steps,
        "local_epochs": sim.local_epochs,
        "proximal_mu": sim.proximal_mu,
        "dropout_rate": sim.dropout_rate,
        "byzantine_clients": sim.byzantine_clients,
        "keep_local": sim.server.keep_local,
        "partition": sim.partition_info,
        "final_val": last_val,
        "per_round": sim.history,
        **payload_report(sim.payload, sim._payload_info, sim.history),
    }
    if sim.client_dp is not None:
        dp = sim.client_dp.report()
        out.update({"epsilon": dp["epsilon"], "delta": dp["delta"], "client_dp": dp})
    if figure:
        out["figures"] = {"rounds": figure}
    return out


def payload_report(payload: str, info: Mapping[str, int], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's payload keys: what travels, its size, and the bytes measured per round."""
    rounds = [r for r in history if "bytes_up" in r]

    def mean(key: str) -> Optional[float]:
        return sum(r[key] for r in rounds) / len(rounds) if rounds else None

    return {
        "payload": payload,
        "payload_tensors": info.get("tensors"),
        "payload_bytes": info.get("bytes"),
        "frozen_bytes": info.get("frozen_bytes"),
        "bytes_up_per_round": mean("bytes_up"),
        "bytes_down_per_round": mean("bytes_down"),
    }


@rank_zero_only
def write_artifacts(
    trainer: pl.Trainer, report: dict[str, Any], history: list[dict[str, Any]], aggregator: str
) -> Optional[str]:
    """``simulation.json`` and the global model's validation curves per round; returns the figure's path."""
    folder = artifact_dir(trainer, "federated")
    write_json(folder / "simulation.json", report)
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        for k, v in record.get("val", {}).items():
            curves.setdefault(k, []).append((record["round"], v))
    if not curves:
        return None
    fig = new_figure(figsize=(5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for metric, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=metric)
    ax.set_xlabel("round")
    ax.set_title(f"Global model, {aggregator}")
    ax.legend()
    path = folder / "rounds.png"
    save_figure(trainer, fig, path, tag="federated/rounds")
    return str(path)
