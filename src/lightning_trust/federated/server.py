"""One aggregation round on full model state dicts, shared by the simulation, the Lightning strategy
and the Flower adapter.

Which entries of a ``state_dict`` go where (the documented rule):

* **parameters** (``named_parameters``) not in ``keep_local``: through the aggregator (and
  client-level DP when on);
* **floating-point buffers** (BatchNorm running mean/var...) not in ``keep_local``: the
  sample-weighted mean of the clients' values (no server optimizer, no noise: they are statistics,
  not learned by gradient; with client-level DP they are kept as they are, since averaging them
  would release client data without noise);
* **integer buffers** (``num_batches_tracked`` counters): the maximum over clients;
* **``keep_local``** entries (FedBN: ``keep_local: [bn]``, any name containing one of the
  patterns or matching it as a glob): never leave the clients; the global model keeps its own value.

Example:
    >>> import torch
    >>> global_state = {"w": torch.zeros(2)}
    >>> s0, s1 = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([4.0, 4.0])}
    >>> server = Server("fedavg")
    >>> new_state, metrics = server.aggregate(global_state, [ClientUpdate(0, s0, 100), ClientUpdate(1, s1, 50)],
    ...                                       param_keys={"w"})
    >>> new_state["w"].tolist(), metrics["clients_aggregated"]
    ([2.0, 2.0], 2.0)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_trust.federated.aggregators import Aggregator, resolve_aggregator
from lightning_trust.federated.dp import ClientDP

State = dict[str, Tensor]


@dataclass
class ClientUpdate:
    """What one client sends back after local training: its weights and how many samples it used."""

    client_id: int
    state: State
    num_samples: int
    loss: Optional[float] = None
    metrics: dict[str, float] = field(default_factory=dict)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """``name`` contains one of ``patterns`` as a dotted component/substring or matches it as a glob."""
    return any(p in name or fnmatch.fnmatchcase(name, p) for p in patterns)


def add_proximal_grad(module: torch.nn.Module, reference: dict[str, Tensor], mu: float) -> None:
    """FedProx: add ``mu * (w - w_reference)``, the gradient of ``mu/2 ||w - w_ref||^2``, to each
    parameter's ``.grad`` (before the optimizer step), leaving the user's loss untouched."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.grad is not None and name in reference:
                p.grad.add_(p.detach() - reference[name].to(p.device), alpha=mu)


class Server:
    """Aggregates client state dicts into the next global state dict.

    Args:
        aggregator: an :class:`Aggregator` or its short name.
        client_dp: client-level DP (DP-FedAvg); needs a mean-based aggregator.
        keep_local: parameter/buffer name patterns that never leave a client (FedBN: ``["bn"]``).
    """

    def __init__(
        self,
        aggregator: Union[str, Aggregator] = "fedavg",
        client_dp: Optional[ClientDP] = None,
        keep_local: Optional[Sequence[str]] = None,
    ) -> None:
        self.aggregator = resolve_aggregator(aggregator)
        if client_dp is not None and not isinstance(client_dp, ClientDP):
            raise TypeError(f"`client_dp` must be a ClientDP or None, got {type(client_dp).__name__}.")
        if client_dp is not None and self.aggregator.robust:
            raise ValueError(
                f"Client-level DP bounds the influence of one client on a (noisy) mean; {self.aggregator.name} is a "
                "robust rule whose sensitivity is not covered. Use FedAvg/FedAvgM/FedAdam/FedYogi/FedAdagrad with "
                "`client_dp`, or drop `client_dp`."
            )
        if keep_local is not None and (isinstance(keep_local, str) or not all(isinstance(p, str) for p in keep_local)):
            raise TypeError(f"`keep_local` must be a list of name patterns, got {keep_local!r}.")
        self.client_dp = client_dp
        self.keep_local = list(keep_local or [])

    def split_keys(self, state: State, param_keys: Iterable[str]) -> tuple[list[str], list[str], list[str], list[str]]:
        """``(parameters, float buffers, integer buffers, local)`` keys of ``state``."""
        param_keys = set(param_keys)
        params, fbufs, ibufs, local = [], [], [], []
        for k, v in state.items():
            if matches_any(k, self.keep_local):
                local.append(k)
            elif k in param_keys:
                params.append(k)
            elif torch.is_floating_point(v):
                fbufs.append(k)
            else:
                ibufs.append(k)
        return params, fbufs, ibufs, local

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        param_keys: Iterable[str],
        expected_clients: Optional[float] = None,
    ) -> tuple[State, dict[str, float]]:
        """The next global state and this round's metrics.

        ``expected_clients`` (the fixed denominator of DP-FedAvg) is required with ``client_dp``.
        With no update and no DP the global state is returned unchanged.
        """
        params, fbufs, ibufs, _ = self.split_keys(global_state, param_keys)
        new_state = {k: v.clone() for k, v in global_state.items()}
        metrics: dict[str, float] = {"clients_aggregated": float(len(updates))}
        if not updates and self.client_dp is None:
            return new_state, metrics
        g = {k: global_state[k] for k in params}
        deltas = [{k: u.state[k].double() - g[k].double() for k in params} for u in updates]
        norms = [ClientDP.norm(d) for d in deltas]
        if self.client_dp is not None:
            if expected_clients is None:
                raise ValueError("Client-level DP needs `expected_clients` (sample rate x number of clients).")
            combined = self.client_dp.privatize(deltas, expected_clients, template=g)
            metrics.update(self.client_dp.last_round)
        else:
            combined = self.aggregator.combine(deltas, [u.num_samples for u in updates])
        new_params = self.aggregator.server_step(g, combined)
        new_state.update(new_params)
        if updates and self.client_dp is None:
            weights = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
            weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(updates))
            for k in fbufs:
                mean = sum(w * u.state[k].double() for w, u in zip(weights, updates))
                new_state[k] = mean.to(global_state[k].dtype)
            for k in ibufs:
                new_state[k] = torch.stack([u.state[k] for u in updates]).max(dim=0).values
        if updates:
            metrics["update_norm_mean"] = float(sum(norms) / len(norms))
            metrics["update_norm_max"] = float(max(norms))
            mean_delta = {k: sum(d[k] for d in deltas) / len(deltas) for k in params}
            drifts = [ClientDP.norm({k: d[k] - mean_delta[k] for k in params}) for d in deltas]
            metrics["client_drift"] = float(sum(drifts) / len(drifts))
        metrics["global_update_norm"] = ClientDP.norm({k: new_params[k].double() - g[k].double() for k in params})
        return new_state, metrics

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"aggregator": self.aggregator.state_dict()}
        if self.client_dp is not None:
            state["client_dp"] = self.client_dp.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state_dict.get("aggregator", {}))
        if self.client_dp is not None and "client_dp" in state_dict:
            self.client_dp.load_state_dict(state_dict["client_dp"])
