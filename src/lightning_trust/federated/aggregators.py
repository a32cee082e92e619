"""Server-side aggregators: pure functions of the global weights and the clients' weights.

Every aggregator works in two stages, so that client-level DP and server optimizers compose:

1. ``combine(deltas, weights)``: the clients' updates ``delta_i = w_i - w_global`` become one
   update. Mean-based aggregators take the sample-weighted mean; robust ones (``Median``,
   ``TrimmedMean``, ``Krum``, ``MultiKrum``) ignore sample counts, which an attacker could inflate.
2. ``server_step(global_state, update)``: the new global weights. ``FedAvg`` adds the update;
   ``FedAvgM``/``FedAdagrad``/``FedAdam``/``FedYogi`` treat ``-update`` as a pseudo-gradient and
   apply a server optimizer (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2),
   whose state (momenta) is checkpointed through ``state_dict``/``load_state_dict``.

Arithmetic runs in float64 and the result is cast back to each tensor's dtype.

Example:
    >>> g = {"w": torch.zeros(2)}
    >>> clients = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([4.0, 4.0])}]
    >>> FedAvg().aggregate(g, clients, [3, 1])["w"]
    tensor([1.7500, 1.7500])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

State = dict[str, Tensor]

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "TrimmedMean",
    "resolve_aggregator",
]


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


def _check_beta(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def _normalized(weights: Union[Sequence[float], Tensor], n: int) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"Got {n} client updates but {w.numel()} weights; pass one sample count per client.")
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"Client weights must be finite, non-negative and not all zero, got {w.tolist()}.")
    return w / w.sum()


class Aggregator:
    """Base class: sample-weighted mean update, plain server step (``w + update``).

    Subclasses override :meth:`combine` (how client updates are merged) and/or
    :meth:`server_step` (how the merged update moves the global weights).
    """

    #: A robust aggregator ignores sample counts and is not a (noisy) mean: client-level DP's
    #: sensitivity analysis does not apply to it.
    robust: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def min_clients(self) -> int:
        """The fewest client updates per round this rule is defined for."""
        return 1

    def check_clients(self, clients_per_round: int, setting: str = "clients_per_round") -> None:
        """Refuse (before training) a round size below :meth:`min_clients`; ``setting`` names what to change."""
        if clients_per_round < self.min_clients():
            raise ValueError(
                f"{self!r} needs at least {self.min_clients()} client updates per round, but {setting} gives "
                f"{clients_per_round}; raise `{setting}` to {self.min_clients()} or more, or choose a smaller rule "
                "parameter (Krum's `f`)."
            )

    # stage 1 ---------------------------------------------------------------------------
    def combine(self, deltas: Sequence[State], weights: Union[Sequence[float], Tensor]) -> State:
        """The sample-weighted mean of the clients' updates."""
        if not deltas:
            raise ValueError("No client updates to aggregate.")
        w = _normalized(weights, len(deltas))
        zero = torch.zeros((), dtype=torch.float64)
        return {k: sum((w[i] * deltas[i][k].double() for i in range(len(deltas))), zero) for k in deltas[0]}

    # stage 2 ---------------------------------------------------------------------------
    def server_step(self, global_state: State, update: State) -> State:
        """The next global weights from the combined update."""
        return {k: (global_state[k].double() + update[k].double()).to(global_state[k].dtype) for k in global_state}

    def aggregate(self, global_state: State, client_states: Sequence[State], weights: Sequence[float]) -> State:
        """``server_step(global, combine(client - global))``: new global weights from client weights."""
        deltas = [{k: c[k].double() - global_state[k].double() for k in global_state} for c in client_states]
        return self.server_step(global_state, self.combine(deltas, weights))

    # checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({args})"


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al., 2017): the sample-weighted mean of the client weights."""


class _ServerOptimizer(Aggregator):
    """An aggregator with per-tensor server optimizer state (momenta), saved in checkpoints."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Tensor]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"state": {name: {k: v.clone() for k, v in s.items()} for name, s in self._state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = {name: {k: v.clone() for k, v in s.items()} for name, s in state_dict.get("state", {}).items()}


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu et al., 2019): ``v = momentum * v + update; w += server_lr * v``.

    Args:
        server_lr: server learning rate.
        momentum: server momentum in ``[0, 1)``.
    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        _check_positive("server_lr", server_lr)
        _check_beta("momentum", momentum)
        self.server_lr = server_lr
        self.momentum = momentum

    def server_step(self, global_state: State, update: State) -> State:
        out = {}
        for k, g in global_state.items():
            s = self._state.setdefault(k, {"v": torch.zeros_like(g, dtype=torch.float64)})
            s["v"] = self.momentum * s["v"] + update[k].double()
            out[k] = (g.double() + self.server_lr * s["v"]).to(g.dtype)
        return out


class _Adaptive(_ServerOptimizer):
    """Reddi et al. (2021), Algorithm 2: ``m = b1 m + (1-b1) D``; ``v`` by the variant;
    ``w += server_lr * m / (sqrt(v) + tau)``; ``m`` starts at 0 and ``v`` at ``tau**2``; no bias correction."""

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__()
        _check_positive("server_lr", server_lr)
        _check_beta("beta1", beta1)
        _check_beta("beta2", beta2)
        _check_positive("tau", tau)
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def _second_moment(self, v: Tensor, d2: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def server_step(self, global_state: State, update: State) -> State:
        out = {}
        for k, g in global_state.items():
            d = update[k].double()
            s = self._state.setdefault(k, {"m": torch.zeros_like(d), "v": torch.full_like(d, self.tau**2)})
            s["m"] = self.beta1 * s["m"] + (1 - self.beta1) * d
            s["v"] = self._second_moment(s["v"], d * d)
            out[k] = (g.double() + self.server_lr * s["m"] / (s["v"].sqrt() + self.tau)).to(g.dtype)
        return out


class FedAdagrad(_Adaptive):
    """FedAdagrad: ``v = v + D**2``. Args: ``server_lr``, ``beta1``, ``tau`` (``beta2`` unused)."""

    def _second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v + d2


class FedAdam(_Adaptive):
    """FedAdam: ``v = b2 v + (1-b2) D**2``. Args: ``server_lr``, ``beta1``, ``beta2``, ``tau``."""

    def _second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(_Adaptive):
    """FedYogi: ``v = v - (1-b2) D**2 sign(v - D**2)``. Args: ``server_lr``, ``beta1``, ``beta2``, ``tau``."""

    def _second_moment(self, v: Tensor, d2: Tensor) -> Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


def _stack(deltas: Sequence[State], key: str) -> Tensor:
    return torch.stack([d[key].double() for d in deltas])


class Median(Aggregator):
    """Coordinate-wise median of the client updates (Yin et al., 2018); the mean of the two middle
    values for an even count, like ``numpy.median``."""

    robust = True

    def combine(self, deltas: Sequence[State], weights: Union[Sequence[float], Tensor]) -> State:
        if not deltas:
            raise ValueError("No client updates to aggregate.")
        n = len(deltas)
        out = {}
        for k in deltas[0]:
            s = _stack(deltas, k).sort(dim=0).values
            out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return out


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean: per coordinate, drop the ``floor(beta * n)`` largest and
    smallest client values and average the rest (Yin et al., 2018).

    Args:
        beta: fraction trimmed from each end, in ``[0, 0.5)``.
    """

    robust = True

    def __init__(self, beta: float = 0.2) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 0.5):
            raise ValueError(f"`beta` must be in [0, 0.5), got {beta!r}.")
        self.beta = beta

    def combine(self, deltas: Sequence[State], weights: Union[Sequence[float], Tensor]) -> State:
        if not deltas:
            raise ValueError("No client updates to aggregate.")
        n = len(deltas)
        cut = int(self.beta * n)
        if n - 2 * cut < 1:
            raise ValueError(f"TrimmedMean(beta={self.beta}) trims every one of the {n} clients; lower `beta`.")
        return {k: _stack(deltas, k).sort(dim=0).values[cut : n - cut].mean(dim=0) for k in deltas[0]}


class Krum(Aggregator):
    """Krum (Blanchard et al., 2017): the update with the smallest sum of squared distances to its
    ``n - f - 2`` nearest neighbours, tolerating ``f`` Byzantine clients.

    Args:
        f: number of Byzantine clients to tolerate.
    """

    robust = True

    def __init__(self, f: int = 1) -> None:
        if not isinstance(f, int) or f < 0:
            raise ValueError(f"`f` must be an integer >= 0, got {f!r}.")
        self.f = f

    def _keep(self, n: int) -> int:
        return 1

    def min_clients(self) -> int:
        """More than ``2f + 2`` updates (Blanchard et al.'s condition)."""
        return 2 * self.f + 3

    def scores(self, deltas: Sequence[State]) -> Tensor:
        """Each client's Krum score (lower is more central)."""
        n = len(deltas)
        flat = torch.stack([torch.cat([d[k].double().flatten() for k in deltas[0]]) for d in deltas])
        dist = torch.cdist(flat, flat).pow(2)
        closest = max(n - self.f - 2, 1)
        # row i: distances to the others, sorted; the 0 to itself comes first
        return dist.sort(dim=1).values[:, 1 : closest + 1].sum(dim=1)

    def combine(self, deltas: Sequence[State], weights: Union[Sequence[float], Tensor]) -> State:
        if not deltas:
            raise ValueError("No client updates to aggregate.")
        n = len(deltas)
        if n <= 2 * self.f + 2 and n > 1:
            raise ValueError(
                f"{self.name}(f={self.f}) needs more than 2f + 2 = {2 * self.f + 2} clients per round, got {n}; "
                "sample more clients per round or lower `f`."
            )
        chosen = self.scores(deltas).argsort()[: self._keep(n)].tolist()
        return {k: torch.stack([deltas[i][k].double() for i in chosen]).mean(dim=0) for k in deltas[0]}


class MultiKrum(Krum):
    """Multi-Krum: the mean of the ``m`` updates with the best Krum scores (``m = n - f`` by default).

    Args:
        f: number of Byzantine clients to tolerate.
        m: number of updates averaged; ``None`` means ``n - f``.
    """

    def __init__(self, f: int = 1, m: Optional[int] = None) -> None:
        super().__init__(f)
        if m is not None and (not isinstance(m, int) or m < 1):
            raise ValueError(f"`m` must be a positive integer or None, got {m!r}.")
        self.m = m

    def _keep(self, n: int) -> int:
        return min(self.m if self.m is not None else n - self.f, n)


#: Short names accepted wherever an aggregator is configured (``aggregator: fedadam``).
AGGREGATORS: dict[str, type[Aggregator]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": Median,
    "trimmedmean": TrimmedMean,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multikrum": MultiKrum,
    "multi_krum": MultiKrum,
}


def resolve_aggregator(aggregator: Union[str, Aggregator]) -> Aggregator:
    """An :class:`Aggregator` from an instance or a short name (``"fedavg"``, ``"fedadam"``...)."""
    if isinstance(aggregator, Aggregator):
        return aggregator
    if isinstance(aggregator, str) and aggregator.lower() in AGGREGATORS:
        return AGGREGATORS[aggregator.lower()]()
    raise ValueError(
        f"Unknown aggregator {aggregator!r}; use one of {sorted(set(AGGREGATORS))} or an Aggregator instance "
        "(e.g. `FedAdam(server_lr=0.01)`, `TrimmedMean(beta=0.2)`)."
    )
