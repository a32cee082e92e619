"""What the explain callbacks declare they log and report: metric name (``<placeholder>`` parts
match any text) or top-level ``report()`` key -> its one-line meaning.

The callbacks carry them as their ``logged_keys`` / ``report_keys`` ClassVars, which the docs are
generated from and tests check against real runs.

Example:
    >>> sorted(ATTRIBUTION_LOGGED_KEYS)[0]
    'explain/convergence_delta'
    >>> "worst_accuracy" in ROBUSTNESS_REPORT_KEYS
    True
"""

from __future__ import annotations

__all__ = ["ATTRIBUTION_LOGGED_KEYS", "ATTRIBUTION_REPORT_KEYS", "ROBUSTNESS_LOGGED_KEYS", "ROBUSTNESS_REPORT_KEYS"]

#: What :class:`~lightning_trust.explain.Attribution` logs, once per pass.
ATTRIBUTION_LOGGED_KEYS: dict[str, str] = {
    "explain/drift": "Spearman rank correlation of the global importance with the previous pass's",
    "explain/convergence_delta": "mean |convergence delta| of the attributions (IG, DeepLift, SHAP methods)",
    "explain/infidelity": "Captum's infidelity of the attributions (lower: more faithful)",
    "explain/sensitivity_max": "Captum's sensitivity_max of the attributions (lower: more stable)",
    "explain/importance/<feature>": "mean |attribution| of one of the top_k features",
}

#: The top-level keys of :meth:`Attribution.report() <lightning_trust.explain.Attribution.report>`
#: (besides ``"figures"``).
ATTRIBUTION_REPORT_KEYS: dict[str, str] = {
    "method": "the Captum method",
    "target": "the class explained: 'pred', 'true' or a class index",
    "baseline": "the baseline: a named one, a number, or 'file'",
    "num_samples": "size of the fixed sample explained",
    "samples_explained": "samples the last pass explained: a prefix of the fixed sample when the budget cut it",
    "aggregated_over": "{samples, of, numbers}: the numbers (top_features, delta, infidelity...) are over that many",
    "epoch": "epoch of the last pass (null before any)",
    "top_features": "the top_k features of the last pass, [{feature, score}]",
    "infidelity": "Captum's infidelity of the last pass",
    "sensitivity_max": "Captum's sensitivity_max of the last pass (null when not computed)",
    "convergence_delta": "mean |convergence delta| of the last pass (null for methods without one)",
    "drift": "rank correlation of the last pass's importance with the pass before",
    "drift_history": "drift of every pass, in order",
    "seconds": "time spent in this callback's passes (explaining, files, figures drawn in fit)",
    "files": "paths of importance.csv/.json, history.json and attributions.pt",
    "input": "the attributed keyword input ('input_ids', 'pixel_values'...; null for a single tensor)",
    "layer": "dotted path of the layer attributed to (the input embeddings for token models; null for input methods)",
    "tokens": "token inputs: each fixed sample's unpadded tokens with their scores, [[{token, score}]] (else null)",
    "generated": "causal LMs: each sample's generated target tokens, attributed to its prompt (else null)",
    "patch_size": "vision transformers: the patch size of the patch heatmaps (else null)",
    "budget": "the overhead budget: max_overhead, measured overhead, runs, skipped, seconds, skipped_passes "
    "(what it dropped: stage, epoch, step, what: a whole 'pass', the last 'samples' or 'sensitivity_max' "
    "perturbations, reason, would_cost_seconds; ran, configured and lower_bound for a partial sensitivity_max; "
    "explained, configured and minimum for samples), pass_seconds (each pass run), final_pass (seconds, "
    "allowance_seconds, minimum_seconds, samples, sensitivity, within_budget), figure_seconds (drawing at "
    "report time, outside the fit)",
}

#: What :class:`~lightning_trust.explain.AdversarialRobustness` logs, once per pass.
ROBUSTNESS_LOGGED_KEYS: dict[str, str] = {
    "robustness/clean_acc": "accuracy on the fixed sample without attack",
    "robustness/worst_acc": "lowest accuracy over the attacks and epsilons (and clean)",
    "robustness/<attack>/acc@<eps>": "robust accuracy under an attack at one epsilon",
    "robustness/<attack>/success@<eps>": "share of the clean-correct samples the attack flips at one epsilon",
    "robustness/min_perturbation": "median smallest FGSM epsilon that flips a sample (min_perturbation=True)",
}

#: The top-level keys of :meth:`AdversarialRobustness.report()
#: <lightning_trust.explain.AdversarialRobustness.report>` (besides ``"figures"``).
ROBUSTNESS_REPORT_KEYS: dict[str, str] = {
    "attacks": "the attacks run",
    "epsilons": "the perturbation budgets, sorted",
    "num_samples": "size of the fixed sample attacked",
    "norm": "PGD's norm ('Linf' or 'L2')",
    "epoch": "epoch of the last pass (null before any)",
    "clean_accuracy": "accuracy on the sample without attack",
    "robust_accuracy": "accuracy per attack and epsilon, {attack: {eps: accuracy}}",
    "worst_accuracy": "lowest accuracy over the attacks and epsilons (and clean)",
    "attack_success_rate": "share of clean-correct samples flipped, {attack: {eps: rate}}",
    "min_perturbation": "the smallest breaking FGSM epsilons found (null unless min_perturbation=True)",
    "space": "what was perturbed: 'inputs' (float inputs, clamped to their range) or 'embeddings' (token inputs)",
    "overhead": "the passes' budget during fit: max_overhead, measured overhead, runs, skipped, seconds",
    "samples": "samples the last pass attacked (a prefix of the fixed sample's order when cut to the budget)",
    "samples_available": "samples of the fixed sample (what a pass without a budget attacks)",
    "truncated": "whether the budget cut the last pass to fewer samples than the fixed sample holds",
    "intervals": "95% Wilson intervals [low, high] of clean_accuracy, robust_accuracy and attack_success_rate",
}
