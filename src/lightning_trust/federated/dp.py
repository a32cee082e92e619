"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018, "Learning Differentially
Private Recurrent Language Models").

Each round every participating client's update is clipped to L2 norm ``clip_norm``; the clipped
updates are summed, Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` is added
and the sum is divided by the *expected* number of clients per round (the fixed-denominator
estimator, so one client changes the result by at most ``clip_norm / expected``). Clients take part
independently with probability ``sample_rate`` (Poisson sampling), which is what the accountant
assumes. The privacy loss is tracked by Opacus's accountant (``rdp``, ``prv`` or ``gdp``), one
``step(noise_multiplier, sample_rate)`` per round; ε is client-level: it bounds what the final
model reveals about whether any one client (all of its data) took part.

With ``adaptive=AdaptiveClipping(...)`` the clip norm follows a quantile of the update norms
(Andrew et al., 2021; :mod:`~lightning_trust.federated.adaptive`): ``clip_norm`` is its start (the
paper's 0.1), the current one is checkpointed, logged (``federated/clip_norm``) and reported.

Example:
    >>> dp = ClientDP(clip_norm=1.0, noise_multiplier=1.1, delta=1e-3)
    >>> dp.account(sample_rate=0.1)
    >>> dp.epsilon() > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from opacus.accountants import create_accountant
from torch import Tensor

from lightning_trust.federated.adaptive import AdaptiveClipping

State = dict[str, Tensor]


class ClientDP:
    """Clip, noise and account client updates (DP-FedAvg).

    Args:
        clip_norm: L2 bound on each client's update (all aggregated parameters together).
        noise_multiplier: noise standard deviation in units of ``clip_norm``.
        delta: the δ at which ε is reported.
        accountant: Opacus accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        seed: seed of the noise generator (its state is checkpointed).
        adaptive: adaptive clipping (:class:`~lightning_trust.federated.adaptive.AdaptiveClipping`);
            ``None``: the clip norm stays ``clip_norm``.
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        delta: float = 1e-5,
        accountant: Literal["rdp", "prv", "gdp"] = "rdp",
        seed: int = 0,
        adaptive: Optional[AdaptiveClipping] = None,
    ) -> None:
        if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"`clip_norm` must be a positive number, got {clip_norm!r}.")
        if not (
            isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0 and math.isfinite(noise_multiplier)
        ):
            raise ValueError(
                f"`noise_multiplier` must be a finite number > 0, got {noise_multiplier!r}; without noise there is no privacy "
                "guarantee (drop `client_dp` to train without DP)."
            )
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"`delta` must be in (0, 1), got {delta!r}; use less than 1 / number of clients.")
        if accountant not in ("rdp", "prv", "gdp"):
            raise ValueError(f"`accountant` must be 'rdp', 'prv' or 'gdp', got {accountant!r}.")
        if adaptive is not None and not isinstance(adaptive, AdaptiveClipping):
            raise TypeError(f"`adaptive` must be an AdaptiveClipping or None, got {type(adaptive).__name__}.")
        self.clip_norm = float(clip_norm)
        self.initial_clip_norm = float(clip_norm)
        self.adaptive = adaptive
        self.last_round: dict[str, float] = {}
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.accountant_name = accountant
        self.seed = seed
        self.accountant = create_accountant(accountant)
        self.generator = torch.Generator().manual_seed(seed)
        self.rounds = 0

    @staticmethod
    def norm(update: State) -> float:
        """The L2 norm of an update over all its tensors."""
        zero = torch.zeros((), dtype=torch.float64)
        return float(torch.sqrt(sum((v.double().pow(2).sum() for v in update.values()), zero)))

    def clip(self, update: State) -> State:
        """``update`` scaled down to norm at most ``clip_norm``."""
        factor = min(1.0, self.clip_norm / (self.norm(update) + 1e-12))
        return {k: v.double() * factor for k, v in update.items()}

    def check_clients(self, expected_clients: float) -> None:
        """Refuse (before training) a noise split adaptive clipping cannot make with this many clients."""
        if self.adaptive is not None:
            self.adaptive.noise_split(self.noise_multiplier, expected_clients)

    def privatize(self, deltas: Sequence[State], expected_clients: float, template: State) -> State:
        """``(sum of clipped updates + N(0, (z C)^2)) / expected_clients``; ``template`` gives the keys
        and shapes when no client survived the round (pure noise is still released). With adaptive
        clipping the update's noise multiplier is ``z_delta`` and the clip norm then moves (the
        round's numbers are in :attr:`last_round`)."""
        if expected_clients <= 0:
            raise ValueError(f"`expected_clients` must be > 0, got {expected_clients}.")
        clip = self.clip_norm
        z, count_std = self.noise_multiplier, 0.0
        if self.adaptive is not None:
            z, count_std = self.adaptive.noise_split(self.noise_multiplier, expected_clients)
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items()}
        unclipped = 0
        for delta in deltas:
            unclipped += int(self.norm(delta) <= clip)
            for k, v in self.clip(delta).items():
                total[k] += v
        for v in total.values():
            v += z * clip * torch.randn(v.shape, generator=self.generator, dtype=torch.float64)
        self.last_round = {"clip_norm": clip}
        if self.adaptive is not None:
            noisy = unclipped + count_std * float(torch.randn((), generator=self.generator, dtype=torch.float64))
            fraction = noisy / expected_clients
            self.clip_norm = self.adaptive.next_clip_norm(clip, fraction)
            self.last_round.update({"unclipped_fraction": fraction, "next_clip_norm": self.clip_norm})
        return {k: v / expected_clients for k, v in total.items()}

    def account(self, sample_rate: float) -> None:
        """Record one round released at client sampling rate ``sample_rate``."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate}.")
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)
        self.rounds += 1

    def epsilon(self, delta: Optional[float] = None) -> float:
        """Client-level ε spent so far at ``delta`` (default: the configured δ); 0 before any round."""
        if self.rounds == 0:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.delta if delta is None else delta))

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "generator": self.generator.get_state(),
            "rounds": self.rounds,
            "clip_norm": self.clip_norm,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state_dict["accountant"])
        self.generator.set_state(state_dict["generator"])
        self.rounds = int(state_dict["rounds"])
        self.clip_norm = float(state_dict.get("clip_norm", self.clip_norm))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "accountant": self.accountant_name,
            "mechanism": "dp-fedavg (client-level, Gaussian, fixed denominator)",
        }
        if self.adaptive is not None:
            out["mechanism"] = "dp-fedavg with adaptive clipping (Andrew et al., 2021; client-level, Gaussian)"
            out["initial_clip_norm"] = self.initial_clip_norm
            out["adaptive"] = self.adaptive.report()
        return out

    def __repr__(self) -> str:
        return (
            f"ClientDP(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, delta={self.delta}, "
            f"accountant={self.accountant_name!r}"
            + (f", adaptive={self.adaptive!r})" if self.adaptive is not None else ")")
        )
