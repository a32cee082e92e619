"""Two runs write their own model cards against the same standards; then the cards are diffed.

    python examples/model_card.py            # a minute or two on a laptop CPU

Run 1 trains with DP-SGD at epsilon 1, run 2 at epsilon 8. Each writes model_card.{md,json,html}
into its log dir and prints the met / not-met summary; the diff shows what the extra privacy
budget bought (accuracy) and cost (epsilon), standard by standard.
"""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_trust.demo import AdultDataModule, TabularMLP
from lightning_trust.evaluation import CrossDomainEvaluation
from lightning_trust.fairness import FairnessMetrics
from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.report import TrustReport, diff_cards, load_card, render_diff_markdown

STANDARDS = {
    "privacy.epsilon": {"max": 4.0},
    "fairness.demographic_parity_difference": {"max": 0.1},
    "evaluation.ood_gap.accuracy": {"max": 0.05},
    "metrics.val/acc": {"min": 0.82},
}


def run(epsilon: float) -> str:
    pl.seed_everything(0)
    report = TrustReport(standards=STANDARDS, sensitive_features=["sex", "race"], domain_key="native_region",
                         title=f"TabularMLP on Adult, DP-SGD at epsilon {epsilon:g}")  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=3,
        default_root_dir=f"runs/model_card_eps{epsilon:g}",
        enable_progress_bar=False,
        callbacks=[
            DifferentialPrivacy(target_epsilon=epsilon, target_delta=1e-5),
            FairnessMetrics(sensitive_features=["sex", "race"]),
            CrossDomainEvaluation(domain_key="native_region", in_domain=["United-States"], metrics=["accuracy"]),
            report,
        ],
    )
    trainer.fit(TabularMLP(lr=0.003), AdultDataModule(batch_size=256))
    return str(report.paths["json"])


if __name__ == "__main__":
    strict, loose = run(1.0), run(8.0)
    print(render_diff_markdown(diff_cards(load_card(strict), load_card(loose)), "epsilon 1", "epsilon 8"))
    # the same from the shell: lightning-trust report <strict> <loose>
