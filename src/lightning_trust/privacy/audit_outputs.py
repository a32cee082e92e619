"""What :class:`~lightning_trust.privacy.PrivacyAudit` reports: its section's keys, the section
itself, and the figure of canary scores in vs out (drawn when the report is asked for).

Example:
    >>> import numpy as np
    >>> fig = scores_figure(np.array([2.0, 1.5, -1.0, -2.0]), np.array([True, True, False, False]), 1, 1, "loss")
    >>> fig.axes[0].get_xlabel()
    'canary score (-loss; higher: guessed in)'
    >>> sorted(REPORT_KEYS)[:3]
    ['abstentions', 'accountant_delta', 'accountant_epsilon']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_trust.core import new_figure

if TYPE_CHECKING:
    from lightning_trust.privacy.audit import PrivacyAudit

__all__ = ["LOGGED_KEYS", "REPORT_KEYS", "audit_report", "scores_figure"]

#: What ``PrivacyAudit`` logs through Lightning's loggers (once, after fit).
LOGGED_KEYS: dict[str, str] = {
    "privacy_audit/epsilon_lower_bound": "the audit's empirical ε lower bound at the chosen confidence",
}

#: The top-level keys of ``PrivacyAudit.report()`` (besides figures).
REPORT_KEYS: dict[str, str] = {
    "method": "one_run: Steinke, Nasr and Jagielski, Privacy Auditing with One (1) Training Run (NeurIPS 2023)",
    "canary_type": "input (held-out training samples, relabeled) or gradient (white-box, in the DP optimizer)",
    "gradient_canary": "dirac or gaussian directions (gradient canaries; null for input canaries)",
    "canary_labels": "random (a class other than the sample's own) or true (input canaries; null for gradient)",
    "score": "loss or margin of the canary's label (input), update_projection (gradient)",
    "canaries": "m, the canaries, each included with probability 1/2 by a seeded coin",
    "included": "canaries the coin put in training",
    "guesses": "k+ + k-: canaries guessed (in for the k+ highest scores, out for the k- lowest)",
    "correct": "guesses that matched the coin",
    "abstentions": "canaries not guessed",
    "k_plus": "canaries guessed in",
    "k_minus": "canaries guessed out",
    "precision": "correct / guesses (null without guesses)",
    "guess_selection": "fixed (the user's k+/k-) or search (k+ = k- over m/2, m/4, ...; confidence split evenly)",
    "candidates": "every (k+, k-) tried, with its correct guesses and bound",
    "confidence": "confidence of the lower bound",
    "delta": "δ of the hypothesis tested (the DP accountant's δ by default, else 0)",
    "epsilon_lower_bound": "ε below which the run is not (ε, δ)-DP, at the confidence (0: nothing shown)",
    "accountant_epsilon": "ε the DifferentialPrivacy accountant claims (null: no DifferentialPrivacy in the run)",
    "accountant_delta": "δ of the accountant's claim",
    "epsilon_gap": "accountant_epsilon - epsilon_lower_bound; negative would contradict the claim",
    "training_samples": "samples the run trained on (real ones and included input canaries)",
    "held_out_samples": "real training samples set aside as canary sources (input canaries)",
    "canary_fraction": "included canaries / training samples: the audit's share of the data (its cost); "
    "gradient canaries: included canaries / (N + included)",
    "canary_steps": "times included gradient canaries joined a noisy step (null for input canaries)",
    "seed": "seed of the coin, the canaries and their per-step draws",
    "score_seconds": "wall time of scoring the canaries after fit",
}


def audit_report(audit: PrivacyAudit) -> dict[str, Any]:
    """The ``privacy_audit`` section (keys: :data:`REPORT_KEYS`, and ``figures``); numbers not
    measured yet (before fit ends) are ``None``."""
    result = audit.result
    gradient = audit.canaries == "gradient"
    included = int(audit.included.sum()) if len(audit.included) else None
    m = audit.num_canaries
    bound = None if result is None else result.epsilon_lower_bound
    claimed = audit.accountant_epsilon
    training = audit.training_samples
    if gradient:
        fraction = included / (training + included) if training is not None and included is not None else None
    else:
        fraction = included / training if training and included is not None else None
    score = "update_projection" if gradient else audit.score
    return {
        "method": "one_run",
        "canary_type": audit.canaries,
        "gradient_canary": audit.gradient_canary if gradient else None,
        "canary_labels": None if gradient else audit.canary_labels,
        "score": score,
        "canaries": m,
        "included": included,
        "guesses": None if result is None else result.guesses,
        "correct": None if result is None else result.correct,
        "abstentions": None if result is None else m - result.guesses,
        "k_plus": None if result is None else result.k_plus,
        "k_minus": None if result is None else result.k_minus,
        "precision": None if result is None or not result.guesses else result.correct / result.guesses,
        "guess_selection": "search" if audit.k_plus is None and audit.k_minus is None else "fixed",
        "candidates": [] if result is None else [dict(c) for c in result.candidates],
        "confidence": audit.confidence,
        "delta": audit.delta if audit.delta is not None else float(audit.accountant_delta or 0.0),
        "epsilon_lower_bound": bound,
        "accountant_epsilon": claimed,
        "accountant_delta": audit.accountant_delta,
        "epsilon_gap": None if claimed is None or bound is None else claimed - bound,
        "training_samples": training,
        "held_out_samples": 0 if gradient else (m if audit.training_samples is not None else None),
        "canary_fraction": fraction,
        "canary_steps": audit.canary_steps,
        "seed": audit.seed,
        "score_seconds": audit.score_seconds,
        "figures": dict(audit.figures),
    }


def scores_figure(
    scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int, score: str, bound: float = 0.0
) -> Any:
    """Histograms of the canaries' scores, in vs out, with the guess thresholds."""
    fig = new_figure(figsize=(5.5, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 10)))
    ax.hist(scores[included], bins=bins, alpha=0.6, color="tab:red", label=f"in ({int(included.sum())})")
    ax.hist(scores[~included], bins=bins, alpha=0.6, color="tab:blue", label=f"out ({int((~included).sum())})")
    order = np.sort(scores)
    if k_plus:
        ax.axvline(order[-k_plus], color="tab:red", linestyle="--", linewidth=1, label=f"guess in: top {k_plus}")
    if k_minus:
        ax.axvline(
            order[k_minus - 1], color="tab:blue", linestyle="--", linewidth=1, label=f"guess out: bottom {k_minus}"
        )
    what = {"loss": "-loss", "margin": "margin", "update_projection": "-<update, canary>"}.get(score, score)
    ax.set_xlabel(f"canary score ({what}; higher: guessed in)")
    ax.set_ylabel("canaries")
    ax.set_title(f"One-run audit: ε ≥ {bound:.3g}")
    ax.legend(loc="upper left", fontsize=7)
    return fig
