"""What :class:`~lightning_trust.privacy.DifferentialPrivacy` leaves behind: the metrics it logs,
its report section, the ε-curve figure, ``privacy.json`` and the checkpoint saved at the budget,
with the tables of logged and report keys (``logged_keys`` / ``report_keys``, kept true by
``tests/privacy``).

Example:
    >>> sorted(LOGGED_KEYS)
    ['privacy/delta', 'privacy/epsilon', 'privacy/noise_multiplier']
    >>> guarantee(2.5, 1e-5, poisson_sampling=False)
    "(2.5, 1e-05)-DP for the training examples assuming Poisson sampling; batches came from the train loader's own sampler instead, so the bound is not proven"
    >>> fig = epsilon_figure([(10, 0.8), (20, 1.2)], "rdp", delta=1e-5, stop_at_epsilon=2.0, noise_multiplier=1.1,
    ...                      sample_rate=0.01)
    >>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
    ('noisy steps', 'ε')
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_trust.core import artifact_dir, new_figure, save_figure, write_json

if TYPE_CHECKING:
    from lightning_trust.privacy.callback import DifferentialPrivacy

__all__ = [
    "LOGGED_KEYS",
    "REPORT_KEYS",
    "epsilon_figure",
    "guarantee",
    "log_epsilon",
    "privacy_report",
    "stop_at_budget",
    "total_clip",
    "write_outputs",
]

#: What ``DifferentialPrivacy`` logs through Lightning's loggers.
LOGGED_KEYS: dict[str, str] = {
    "privacy/epsilon": "ε spent so far at δ (Opacus's accountant), every log_every_n_steps noisy steps",
    "privacy/delta": "δ of the guarantee",
    "privacy/noise_multiplier": "noise multiplier σ of the noisy steps",
}

#: The top-level keys of ``DifferentialPrivacy.report()`` (besides figures).
REPORT_KEYS: dict[str, str] = {
    "mechanism": "the DP mechanism: the subsampled Gaussian mechanism of DP-SGD",
    "accountant": "Opacus accountant that computed ε: prv, rdp or gdp",
    "epsilon": "ε spent at δ over every noisy step (resumed runs included)",
    "delta": "δ of the guarantee",
    "noise_multiplier": "noise multiplier σ (noise std = σ · max_grad_norm)",
    "max_grad_norm": "per-sample clipping bound C (per-layer bounds: their Euclidean total)",
    "steps": "noisy optimizer steps accounted",
    "sample_rate": "Poisson sample rate q of a logical batch",
    "sampling": "poisson, or shuffle when Poisson sampling was switched off",
    "unmet_assumptions": "assumptions of the ε computation that did not hold (poisson_sampling: batches were not "
    "Poisson sampled, so ε is what Poisson sampling would give, not a proven bound; per_sample_loss: token-level "
    "targets without `per_sample_loss=True`, so the loss may couple the batch's samples); empty when all held",
    "target_epsilon": "the ε the noise was planned for (null with a fixed noise multiplier)",
    "stop_at_epsilon": "the budget training stops before exceeding (null: none)",
    "stopped_at_budget": "whether training stopped at the budget",
    "clipping": "flat or per_layer clipping",
    "grad_sample_mode": "the grad_sample_mode asked for: hooks, functorch, ghost, bk or auto",
    "grad_sample_mode_used": "how per-sample clipping was computed: hooks, functorch, ghost or bk (auto resolved)",
    "expected_batch_size": "expected logical batch size per rank",
    "dataset_size": "training set size N",
    "world_size": "number of DDP ranks",
    "planned_steps": "noisy steps planned for the run (null: unbounded)",
    "secure_rng": "whether noise and sampling used a cryptographically secure generator",
    "guarantee": "the guarantee in words, with its assumptions",
    "epsilon_curve": "[noisy steps, ε] at every logged step",
}


def guarantee(epsilon: float, delta: Optional[float], poisson_sampling: bool, per_sample_loss: bool = True) -> str:
    """The guarantee in words, with the assumptions that do not hold (no Poisson sampling, a batch-coupled loss)."""
    text = f"({epsilon:.4g}, {delta:.3g})-DP for the training examples" if delta is not None else "not trained yet"
    if not poisson_sampling:
        text += (
            " assuming Poisson sampling; batches came from the train loader's own sampler instead, so the bound "
            "is not proven"
        )
    if not per_sample_loss:
        text += (
            "; it assumes a mean of per-sample losses, while the token-level targets suggest a loss averaged over "
            "the batch's tokens (see unmet_assumptions)"
        )
    return text


def total_clip(dp: DifferentialPrivacy) -> float:
    """The clipping bound of the whole gradient: the flat bound, or the Euclidean total of per-layer bounds."""
    from lightning_trust.privacy.callback import DifferentialPrivacy  # the callback imports this module

    norms = dp.clip_norms
    if norms is None or type(dp).clip_plan is DifferentialPrivacy.clip_plan:
        norms = dp.max_grad_norm  # the user's own number, not its rounded per-layer split
    if isinstance(norms, (int, float)):
        return float(norms)
    return float(math.sqrt(sum(c * c for c in norms)))


def unmet_assumptions(dp: DifferentialPrivacy) -> list[str]:
    """The assumptions of the ε computation that this run did not meet (empty: none known)."""
    unmet = [] if dp.poisson_sampling else ["poisson_sampling"]
    return unmet + (["per_sample_loss"] if dp._token_loss.unmet else [])


def privacy_report(dp: DifferentialPrivacy) -> dict[str, Any]:
    """Plain-JSON summary for the standards report (keys: :data:`REPORT_KEYS`, and ``figures``)."""
    return {
        "mechanism": "subsampled_gaussian",
        "accountant": dp.accountant,
        "epsilon": float(dp.epsilon_spent),
        "delta": dp.delta,
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": total_clip(dp),
        "steps": dp.steps,
        "sample_rate": dp.sample_rate,
        "sampling": "poisson" if dp.poisson_sampling else "shuffle",
        "unmet_assumptions": unmet_assumptions(dp),
        "target_epsilon": dp.target_epsilon,
        "stop_at_epsilon": dp.stop_at_epsilon,
        "stopped_at_budget": dp.stopped_at_budget,
        "clipping": dp.clipping,
        "grad_sample_mode": dp.grad_sample_mode,
        "grad_sample_mode_used": dp.grad_sample_mode_used,
        "expected_batch_size": dp.expected_batch_size,
        "dataset_size": dp.num_samples,
        "world_size": dp.world_size,
        "planned_steps": dp.planned_steps,
        "secure_rng": dp.secure_rng,
        "guarantee": guarantee(dp.epsilon_spent, dp.delta, dp.poisson_sampling, not dp._token_loss.unmet),
        "epsilon_curve": [[s, e] for s, e in dp.epsilon_curve],
        "figures": dict(dp.figures),
    }


def log_epsilon(dp: DifferentialPrivacy, pl_module: pl.LightningModule, steps: int) -> None:
    """Add ``(steps, ε)`` to the ε curve and log the ``privacy/*`` metrics."""
    epsilon = dp.epsilon_spent
    dp.epsilon_curve.append((steps, epsilon))
    pl_module.log_dict(
        {
            "privacy/epsilon": epsilon,
            "privacy/delta": float(dp.delta or 0.0),
            "privacy/noise_multiplier": float(dp.noise_multiplier or 0.0),
        },
        on_step=True,
        on_epoch=False,
        batch_size=1,
    )


def stop_at_budget(dp: DifferentialPrivacy, trainer: pl.Trainer, pl_module: pl.LightningModule, steps: int) -> None:
    """One more step would exceed ``stop_at_epsilon``: stop, log the last ε and save a checkpoint."""
    dp.stopped_at_budget = True
    trainer.should_stop = True
    if not dp.epsilon_curve or dp.epsilon_curve[-1][0] != steps:
        log_epsilon(dp, pl_module, steps)
    path = artifact_dir(trainer, "privacy") / "budget_reached.ckpt"
    trainer.save_checkpoint(path)
    dp.checkpoint_path = str(path)
    rank_zero_info(
        f"DifferentialPrivacy: ε={dp.epsilon_spent:.4g} after {steps} steps; one more step would exceed "
        f"stop_at_epsilon={dp.stop_at_epsilon}. Stopping; checkpoint saved to {path}."
    )


def write_outputs(dp: DifferentialPrivacy, trainer: pl.Trainer) -> None:
    """The last point of the ε curve, its figure, and ``privacy.json``."""
    steps = dp.steps
    if steps and (not dp.epsilon_curve or dp.epsilon_curve[-1][0] != steps):
        dp.epsilon_curve.append((steps, dp.epsilon_spent))
    folder = artifact_dir(trainer, "privacy")
    if dp.epsilon_curve and trainer.is_global_zero:
        path = folder / "epsilon_curve.png"
        figure = epsilon_figure(
            dp.epsilon_curve, dp.accountant, dp.delta, dp.stop_at_epsilon, dp.noise_multiplier, dp.sample_rate
        )
        save_figure(trainer, figure, path, tag="privacy/epsilon_curve")
        dp.figures["epsilon_curve"] = str(path)
    write_json(folder / "privacy.json", dp.report())


def epsilon_figure(
    curve: list[tuple[int, float]],
    accountant: str,
    delta: Optional[float],
    stop_at_epsilon: Optional[float],
    noise_multiplier: Optional[float],
    sample_rate: Optional[float],
) -> Any:
    """ε against noisy steps (from 0), with the budget line."""
    fig = new_figure(figsize=(5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    points = curve if curve[0][0] == 0 else [(0, 0.0)] + curve
    steps, eps = zip(*points)
    ax.plot(steps, eps, marker="o", markersize=3, label=f"ε ({accountant}, δ={delta:.2g})")
    if stop_at_epsilon is not None:
        ax.axhline(stop_at_epsilon, color="tab:red", linestyle="--", label="budget")
    ax.set_xlabel("noisy steps")
    ax.set_ylabel("ε")
    ax.set_title(f"Privacy spent (σ={noise_multiplier:.3g}, q={sample_rate:.3g})")
    ax.legend(loc="lower right")
    return fig
