"""Gradient-space (white-box) canaries of the one-run audit, inside the DP optimizer.

Each of ``m`` canaries is a fixed direction ``u`` over the trainable parameters (``"dirac"``: one
coordinate, distinct per canary, the paper's choice; ``"gaussian"``: a dense random unit vector),
included with probability 1/2 by a seeded coin. At every noisy step each included canary joins the
step with the run's sample rate ``q``, like a sample of the Poisson draw, as one more clipped
per-sample gradient: ``s * u`` with ``s`` the clipping bound (per-layer clipping: the largest ``s``
that keeps every layer's part within its bound), added to the summed clipped gradients before the
noise (:meth:`~lightning_trust.privacy.DifferentialPrivacy.extend_training`). Under DDP rank 0 adds
it, as it adds the noise. The draws of step ``t`` come from ``(seed, t)``, so a resumed run draws the
same ones.

A canary's score is the inner product of the total parameter update with its direction, negated
(the optimizer steps against the gradient): ``-<θ_T - θ_0, u>``. ``<θ_0, u>`` is taken when training
starts and kept in the checkpoint.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 3)
    >>> canaries = GradientCanaries(num_canaries=5, seed=0, kind="dirac")
    >>> canaries.bind(model)
    >>> canaries.start(model)
    >>> with torch.no_grad():
    ...     _ = model.weight.sub_(1.0)  # an update of -1 on every weight
    >>> [round(s, 3) for s in canaries.scores(model).tolist()] == [1.0 if c < 12 else 0.0 for c in canaries.coordinates]
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

__all__ = ["GradientCanaries"]

_MAX_GAUSSIAN_ELEMENTS = 50_000_000  # m x P random numbers drawn for each projection of gaussian canaries


class GradientCanaries:
    """The coin, directions and starting projections of ``num_canaries`` gradient canaries."""

    def __init__(self, num_canaries: int, seed: int, kind: str = "dirac") -> None:
        self.num_canaries, self.seed, self.kind = num_canaries, seed, kind
        self.coin = np.random.default_rng([seed, 0]).random(num_canaries) < 0.5
        self.layout: list[tuple[str, int]] = []  # (name, numel) of the trainable parameters, in module order
        self.coordinates = np.zeros(0, dtype=np.int64)  # dirac: one flat coordinate per canary
        self.initial: Optional[np.ndarray] = None  # <θ_0, u_i>
        self.added = np.zeros(num_canaries, dtype=np.int64)  # times each canary joined a step (this rank)
        self._params: dict[str, nn.Parameter] = {}

    # ------------------------------------------------------------------ layout and directions
    def bind(self, module: nn.Module) -> None:
        """Lay the directions over ``module``'s trainable parameters (a restored layout must match)."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        layout = [(n, int(p.numel())) for n, p in named]
        self._params = dict(named)
        total = sum(size for _, size in layout)
        if self.layout and self.layout != layout:
            raise ValueError(
                "The module's trainable parameters differ from those the audit's gradient canaries were laid over "
                "(checkpoint); resume with the same model."
            )
        m = self.num_canaries
        if self.kind == "dirac" and m > total:
            raise ValueError(
                f"PrivacyAudit(num_canaries={m}) with Dirac canaries needs one parameter coordinate per canary; the "
                f"model has {total} trainable parameters. Lower num_canaries."
            )
        if self.kind == "gaussian" and m * total > _MAX_GAUSSIAN_ELEMENTS:
            raise ValueError(
                f"{m} gaussian canaries over {total} parameters draw {m * total:,} random numbers per projection; use "
                "gradient_canary='dirac' (one coordinate each) or fewer canaries."
            )
        if not self.layout:
            self.layout = layout
            if self.kind == "dirac":
                self.coordinates = np.random.default_rng([self.seed, 1]).choice(total, size=m, replace=False)

    def _direction(self, index: int) -> torch.Tensor:
        total = sum(size for _, size in self.layout)
        u = torch.from_numpy(np.random.default_rng([self.seed, 1, index]).standard_normal(total))
        return u / u.norm()

    def _flat(self, module: nn.Module) -> torch.Tensor:
        params = dict(module.named_parameters())
        return torch.cat([params[name].detach().reshape(-1).double().cpu() for name, _ in self.layout])

    def _projections(self, module: nn.Module) -> np.ndarray:
        flat = self._flat(module)
        if self.kind == "dirac":
            return flat[torch.from_numpy(self.coordinates)].numpy()
        return np.array([float(flat @ self._direction(i)) for i in range(self.num_canaries)])

    def start(self, module: nn.Module) -> None:
        """Take ``<θ_0, u_i>`` (training starts; kept when restored from a checkpoint)."""
        if self.initial is None:
            self.initial = self._projections(module)

    def scores(self, module: nn.Module) -> np.ndarray:
        """``-<θ_T - θ_0, u_i>`` per canary: high when the updates moved against the canary's gradient."""
        if self.initial is None:
            raise RuntimeError("The gradient canaries have no starting point; training never started.")
        return -(self._projections(module) - self.initial)

    # ------------------------------------------------------------------ the step
    def add(self, optimizer: DPOptimizer, step: int, sample_rate: float) -> None:
        """Add this step's Poisson-drawn included canaries to ``p.summed_grad`` of ``optimizer``."""
        draws = np.random.default_rng([self.seed, 2, step]).random(self.num_canaries) < sample_rate
        chosen = np.flatnonzero(draws & self.coin)
        if not len(chosen):
            return
        self.added[chosen] += 1
        params = list(optimizer.params)
        bounds = _bounds(optimizer, params)
        names = [name for name, _ in self.layout]
        position = {id(p): k for k, p in enumerate(params)}
        blocks = [self._params[name] for name in names]
        missing = [name for name, p in zip(names, blocks) if id(p) not in position]
        if missing:
            raise RuntimeError(
                f"The DP optimizer does not hold the parameters {missing[:3]}, over which the gradient canaries lie; "
                "give the optimizer every trainable parameter."
            )
        offsets = np.cumsum([0] + [size for _, size in self.layout])
        for i in chosen:
            if self.kind == "dirac":
                block = int(np.searchsorted(offsets, self.coordinates[i], side="right") - 1)
                p = blocks[block]
                local = np.unravel_index(int(self.coordinates[i] - offsets[block]), tuple(p.shape))
                with torch.no_grad():
                    _summed(p)[local] += bounds[position[id(p)]]
                continue
            u = self._direction(int(i))
            parts = [u[offsets[k] : offsets[k + 1]] for k in range(len(blocks))]
            scale = bounds[0]  # flat clipping: the bound times a unit direction
            if _per_layer(optimizer):  # the largest multiple that keeps every layer's part within its bound
                scale = min(bounds[position[id(p)]] / max(float(part.norm()), 1e-12) for p, part in zip(blocks, parts))
            with torch.no_grad():
                for p, part in zip(blocks, parts):
                    summed = _summed(p)
                    summed.add_((scale * part).to(summed).view_as(summed))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "coin": self.coin.tolist(),
            "layout": [list(entry) for entry in self.layout],
            "coordinates": self.coordinates.tolist(),
            "initial": None if self.initial is None else self.initial.tolist(),
            "added": self.added.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kind, self.seed = str(state["kind"]), int(state["seed"])
        self.coin = np.asarray(state["coin"], dtype=bool)
        self.num_canaries = len(self.coin)
        self.layout = [(str(name), int(size)) for name, size in state["layout"]]
        self.coordinates = np.asarray(state["coordinates"], dtype=np.int64)
        self.initial = None if state["initial"] is None else np.asarray(state["initial"], dtype=np.float64)
        self.added = np.asarray(state.get("added", [0] * self.num_canaries), dtype=np.int64)


def _summed(p: nn.Parameter) -> torch.Tensor:
    """The sum of ``p``'s clipped per-sample gradients that Opacus keeps on the parameter."""
    return p.summed_grad  # type: ignore[attr-defined]  # set by Opacus's clip_and_accumulate


def _per_layer(optimizer: DPOptimizer) -> bool:
    return isinstance(getattr(optimizer, "max_grad_norms", None), list)


def _bounds(optimizer: DPOptimizer, params: Sequence[nn.Parameter]) -> list[float]:
    """The clipping bound of each optimizer parameter (the flat bound for all, or the per-layer ones)."""
    if _per_layer(optimizer):
        return [float(c) for c in optimizer.max_grad_norms]
    return [float(optimizer.max_grad_norm)] * len(params)
