"""Explanations while a SmallCNN learns the bundled 8x8 digits: integrated-gradients heatmaps of a fixed,
class-stratified sample, their quality (infidelity, sensitivity, IG delta), explanation drift per epoch,
and FGSM/PGD robust accuracy.

    python examples/explain_digits.py                          # 10 epochs, IG heatmaps, robustness at the end
    python examples/explain_digits.py --method occlusion       # other Captum methods by name
    python examples/explain_digits.py --method layer_gradcam   # Grad-CAM on the second conv block
    python examples/explain_digits.py --baseline blur --dp     # with DP-SGD in the same Trainer

Then: tensorboard --logdir runs/explain_digits  (heatmaps, overlays, robust-accuracy curve, explain/* scalars)
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_trust.demo import DigitsDataModule, SmallCNN
from lightning_trust.explain import AdversarialRobustness, Attribution

OPTIONS = {
    "integrated_gradients": {"n_steps": 32},
    "occlusion": {"sliding_window_shapes": [1, 2, 2], "strides": [1, 1, 1]},
    "gradient_shap": {"n_samples": 8, "stdevs": 0.05},
    "layer_gradcam": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="integrated_gradients", choices=sorted(OPTIONS))
    parser.add_argument("--baseline", default="zeros", choices=["zeros", "mean", "blur", "train"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dp", action="store_true", help="train with DifferentialPrivacy (Opacus) as well")
    parser.add_argument("--root", default="runs/explain_digits")
    args = parser.parse_args()

    pl.seed_everything(42)
    baseline = "train" if args.method == "gradient_shap" else args.baseline
    attribution = Attribution(
        method=args.method,
        method_kwargs=OPTIONS[args.method],
        layer="features.2" if args.method == "layer_gradcam" else None,
        baseline="zeros" if args.method == "layer_gradcam" else baseline,
        num_samples=32,
        every_n_epochs=2,
        figures="end",
    )
    robustness = AdversarialRobustness(
        epsilons=[0.0, 0.05, 0.1, 0.2], input_range=[0.0, 1.0], run_on="fit_end", min_perturbation=True
    )
    callbacks: list[pl.Callback] = [attribution, robustness]
    if args.dp:
        from lightning_trust.privacy import DifferentialPrivacy

        callbacks.insert(0, DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0))
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, default_root_dir=args.root,
        logger=[TensorBoardLogger(args.root, name=""), CSVLogger(args.root, name="")], callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(SmallCNN(), DigitsDataModule())

    explain, robust = attribution.report(), robustness.report()
    print("top pixels:", [(t["feature"], round(t["score"], 4)) for t in explain["top_features"][:5]])
    print("drift per pass:", [None if d is None else round(d, 3) for d in explain["drift_history"]])
    print(json.dumps({k: explain[k] for k in ("infidelity", "sensitivity_max", "convergence_delta")}, indent=2))
    print(json.dumps({k: robust[k] for k in ("clean_accuracy", "robust_accuracy", "min_perturbation")}, indent=2))
    print("figures:", {**explain["figures"], **robust["figures"]})


if __name__ == "__main__":
    main()
