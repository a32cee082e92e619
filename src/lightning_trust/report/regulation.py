"""Which regulatory heading each number of a model card serves: the mapping table (data only).

Sources (the headings are shortened; read the texts for the full requirement):

- **EU AI Act**: Regulation (EU) 2024/1689 of 13 June 2024 (Artificial Intelligence Act), OJ L 2024/1689,
  12.7.2024, Annex IV "Technical documentation referred to in Article 11(1)", points 1-9 and the
  lettered items of point 2. http://data.europa.eu/eli/reg/2024/1689/oj
- **NIST AI RMF**: NIST AI 100-1, *Artificial Intelligence Risk Management Framework (AI RMF 1.0)*,
  January 2023, Table 3 (categories and subcategories of the MEASURE function).
  https://doi.org/10.6028/NIST.AI.100-1

A number is matched by its dotted card name (``privacy.epsilon``, ``metrics.val/acc``,
``fairness.by_group.sex.Female.accuracy``) against :data:`RULES` in order, first match wins; the
rule names a :data:`TOPICS` entry, which names the Annex IV points and MEASURE subcategories.
A section no rule names is reported as unmapped, never guessed.

Example:
    >>> topic_of("privacy.epsilon"), topic_of("metrics.val/acc"), topic_of("fairness.by_group.sex.Male.accuracy")
    ('privacy', 'accuracy', 'accuracy_per_group')
    >>> TOPICS["privacy"].annex_iv, TOPICS["privacy"].nist
    (('2(d)', '2(h)'), ('MEASURE 2.10',))
    >>> topic_of("mycheck.score") is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional

__all__ = ["ANNEX_IV", "NIST_MEASURE", "RULES", "SOURCES", "TOPICS", "Topic", "topic_of"]

#: The texts the headings are shortened from (no links: the card loads and links nothing).
SOURCES: dict[str, str] = {
    "eu_ai_act": "Regulation (EU) 2024/1689 (Artificial Intelligence Act, CELEX 32024R1689), Annex IV: technical "
    "documentation referred to in Article 11(1)",
    "nist_ai_rmf": "NIST AI 100-1, Artificial Intelligence Risk Management Framework (AI RMF 1.0), January 2023, "
    "Table 3: MEASURE subcategories (doi:10.6028/NIST.AI.100-1)",
}

#: Annex IV points and items the card has evidence for (short headings of the Act's text).
ANNEX_IV: dict[str, str] = {
    "2(a)": "methods and steps performed for the development of the AI system",
    "2(b)": "design specifications: key design choices, what the system optimises for, trade-offs made",
    "2(c)": "system architecture; computational resources used to develop, train, test and validate",
    "2(d)": "data requirements: datasheets of the training data sets, their provenance, scope and main characteristics",
    "2(e)": "human oversight measures (Art. 14), incl. technical measures to facilitate the interpretation of "
    "outputs (Art. 13(3)(d))",
    "2(g)": "validation and testing procedures and data; metrics of accuracy, robustness and compliance, and of "
    "potentially discriminatory impacts; test logs and reports",
    "2(h)": "cybersecurity measures put in place",
    "3": "monitoring, functioning and control: capabilities and limitations in performance, degrees of accuracy "
    "for specific persons or groups and overall expected accuracy",
    "9": "system to evaluate performance in the post-market phase (Art. 72), incl. the post-market monitoring plan",
}

#: NIST AI RMF 1.0 MEASURE subcategories the card has evidence for (shortened).
NIST_MEASURE: dict[str, str] = {
    "MEASURE 2.1": "Test sets, metrics, and details about the tools used during TEVV are documented.",
    "MEASURE 2.3": "AI system performance or assurance criteria are measured and demonstrated for conditions "
    "similar to deployment setting(s).",
    "MEASURE 2.4": "The functionality and behavior of the AI system and its components are monitored when in "
    "production.",
    "MEASURE 2.5": "The AI system is demonstrated to be valid and reliable; limitations of the generalizability "
    "beyond the development conditions are documented.",
    "MEASURE 2.7": "AI system security and resilience are evaluated and documented.",
    "MEASURE 2.9": "The AI model is explained, validated, and documented, and its output is interpreted within "
    "its context.",
    "MEASURE 2.10": "Privacy risk of the AI system is examined and documented.",
    "MEASURE 2.11": "Fairness and bias are evaluated and results are documented.",
    "MEASURE 2.12": "Environmental impact and sustainability of AI model training and management activities are "
    "assessed and documented.",
}


@dataclass(frozen=True)
class Topic:
    """One kind of evidence: what it shows, the headings it serves and what provides it."""

    title: str
    annex_iv: tuple[str, ...]
    nist: tuple[str, ...]
    provided_by: str
    #: Patterns of the numbers a rendering names first (the topic's headline numbers).
    headline: tuple[str, ...] = ()


#: The kinds of evidence, in the order the card shows them; each is listed, with "no evidence in this
#: run" when the run reports none of its numbers.
TOPICS: dict[str, Topic] = {
    "data_governance": Topic(
        "Data governance: split sizes, class balance, group sizes",
        ("2(d)", "2(g)"),
        ("MEASURE 2.1",),
        "TrustReport's data facts (a datamodule with train/val/test datasets)",
    ),
    "accuracy": Topic(
        "Accuracy on validation and test data",
        ("2(g)", "3"),
        ("MEASURE 2.3", "MEASURE 2.5"),
        "the model's own validation/test metrics (self.log('val/acc', ...))",
        ("metrics.test/*", "metrics.val*/*"),
    ),
    "accuracy_per_group": Topic(
        "Accuracy and error rates per group; group disparities",
        ("2(g)", "3"),
        ("MEASURE 2.11",),
        "FairnessMetrics (sensitive_features), FairnessPenalty or a fairness threshold callback",
        ("fairness.*_difference", "*coverage_gap*"),
    ),
    "robustness": Topic(
        "Robustness across domains and corruptions (out-of-domain gap)",
        ("2(g)", "3"),
        ("MEASURE 2.5",),
        "CrossDomainEvaluation (domain_key or corruptions)",
        ("evaluation.worst.*", "evaluation.ood_gap.*"),
    ),
    "adversarial_robustness": Topic(
        "Adversarial robustness (model evasion)",
        ("2(g)", "2(h)"),
        ("MEASURE 2.7",),
        "AdversarialRobustness",
    ),
    "privacy": Topic(
        "Differential privacy guarantee (accountant's epsilon, delta)",
        ("2(d)", "2(h)"),
        ("MEASURE 2.10",),
        "DifferentialPrivacy",
        ("privacy.epsilon", "privacy.delta"),
    ),
    "privacy_audit": Topic(
        "Empirical privacy audit (one-run epsilon lower bound)",
        ("2(g)", "2(h)"),
        ("MEASURE 2.10", "MEASURE 2.7"),
        "PrivacyAudit",
        ("*epsilon_lower_bound", "*accountant_epsilon"),
    ),
    "explainability": Topic(
        "Explanations: feature attributions and their faithfulness",
        ("2(e)", "3"),
        ("MEASURE 2.9",),
        "Attribution",
        ("explain.infidelity", "explain.sensitivity_max"),
    ),
    "uncertainty": Topic(
        "Uncertainty: conformal coverage and set size, calibration",
        ("2(g)", "3"),
        ("MEASURE 2.5",),
        "conformal prediction and calibration (an `uncertainty` or `evaluation.conformal` section)",
        ("*coverage", "*mean_set_size", "*ece*"),
    ),
    "monitoring": Topic(
        "Monitoring baselines: distribution-shift tests, attribution drift",
        ("3", "9"),
        ("MEASURE 2.4", "MEASURE 2.5"),
        "two-sample shift tests between training and each domain, or Attribution's drift across epochs",
    ),
    "compute": Topic(
        "Model size, compute and compression",
        ("2(b)", "2(c)"),
        ("MEASURE 2.12",),
        "TrustReport's model and training facts; ProgressivePruning, QuantizationAwareTraining",
    ),
    "development": Topic(
        "Development process: training schedule, seed, federated rounds",
        ("2(a)",),
        (),
        "TrustReport's training facts; FederatedSimulation",
    ),
}

#: ``(pattern, topic)``: shell-style patterns on the dotted name (``*`` also crosses dots), first match wins.
RULES: tuple[tuple[str, str], ...] = (
    # facts the report itself records
    ("data.*", "data_governance"),
    ("model.*", "compute"),
    ("training.duration_s", "compute"),
    ("training.hardware.*", "compute"),
    ("training.*", "development"),
    # logged metrics, by their prefix (a callback's log names follow its section)
    ("metrics.val/*", "accuracy"), ("metrics.valid/*", "accuracy"), ("metrics.validation/*", "accuracy"),
    ("metrics.test/*", "accuracy"),
    ("metrics.*shift*", "monitoring"),
    ("metrics.fairness/*", "accuracy_per_group"), ("metrics.fairness_mitigation/*", "accuracy_per_group"),
    ("metrics.domain/*", "robustness"), ("metrics.evaluation/*", "robustness"),
    ("metrics.robustness/*", "adversarial_robustness"),
    ("metrics.privacy_audit/*", "privacy_audit"), ("metrics.privacy/*", "privacy"),
    ("metrics.explain/*", "explainability"),
    ("metrics.uncertainty/*by_group*", "accuracy_per_group"), ("metrics.conformal/*by_group*", "accuracy_per_group"),
    ("metrics.uncertainty/*", "uncertainty"), ("metrics.conformal/*", "uncertainty"),
    ("metrics.calibration/*", "uncertainty"),
    ("metrics.compression/*", "compute"), ("metrics.quantization/*", "compute"),
    ("metrics.federated/*", "development"),
    ("metrics.*", "development"),  # train/*, epoch, step, unprefixed names: the training curve
    # callback sections
    ("privacy_audit.*", "privacy_audit"),
    ("privacy.*", "privacy"),
    ("fairness.*", "accuracy_per_group"), ("fairness_mitigation.*", "accuracy_per_group"),
    # conformal prediction, calibration and shift tests: in an `uncertainty` section, their own, or `evaluation`
    ("*.shift*", "monitoring"), ("shift.*", "monitoring"), ("*.two_sample*", "monitoring"), ("*.mmd*", "monitoring"),
    ("uncertainty.*by_group*", "accuracy_per_group"), ("evaluation.conformal*by_group*", "accuracy_per_group"),
    ("conformal.*by_group*", "accuracy_per_group"),
    ("uncertainty.*", "uncertainty"), ("conformal.*", "uncertainty"), ("calibration.*", "uncertainty"),
    ("evaluation.conformal*", "uncertainty"), ("evaluation.calibration*", "uncertainty"),
    ("evaluation.temperature*", "uncertainty"),
    ("evaluation.*", "robustness"),
    ("robustness.*", "adversarial_robustness"),
    ("explain.drift*", "monitoring"),
    ("explain.*", "explainability"),
    ("compression.*accuracy*", "accuracy"), ("quantization.*agreement*", "accuracy"),
    ("quantization.*accuracy*", "accuracy"),
    ("compression.*", "compute"), ("quantization.*", "compute"),
    ("federated.*", "development"),
)  # fmt: skip


def topic_of(name: str) -> Optional[str]:
    """The topic of a dotted card name (first matching rule), ``None`` when no rule names it."""
    for pattern, topic in RULES:
        if fnmatchcase(name, pattern):
            return topic
    return None
