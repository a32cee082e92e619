"""The callbacks inside real training: isolation (with and without DP), files, loggers, resume, DDP."""

import csv
import itertools
import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_trust.demo import SmallCNN
from lightning_trust.explain import AdversarialRobustness, Attribution
from lightning_trust.privacy import DifferentialPrivacy
from tests.ddp_harness import run_ddp
from tests.explain.helpers import SGDMLP, DigitsSubset, Synthetic
from tests.support import trainer


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _fit_synthetic(callbacks, dp=None, epochs=2):
    torch.manual_seed(0)
    model = SGDMLP(input_dim=8, hidden_dims=[16])
    cbs = ([dp] if dp is not None else []) + callbacks
    trainer(max_epochs=epochs, callbacks=cbs).fit(model, Synthetic(n=1024, batch_size=64))
    return model


def _explainers():
    return [
        Attribution(
            method="integrated_gradients", num_samples=16, sensitivity_samples=2, figures="never", max_overhead=None
        ),
        AdversarialRobustness(epsilons=[0.0, 0.3], num_samples=32, pgd_steps=3, random_start=True, max_overhead=None),
    ]


@pytest.mark.slow
def test_training_is_unchanged_by_the_callbacks():
    plain_model = _fit_synthetic([])
    plain = _params(plain_model)
    cbs = _explainers()
    explained = _fit_synthetic(cbs)
    for a, b in zip(plain, _params(explained)):
        assert torch.equal(a, b)
    assert len(cbs[0].history) == 2 and len(cbs[1].history) == 2
    # modes and requires_grad are as Lightning leaves them without the callbacks (frozen only inside passes)
    assert [m.training for m in explained.modules()] == [m.training for m in plain_model.modules()]
    assert all(p.requires_grad for p in explained.parameters())


@pytest.mark.slow
def test_with_differential_privacy_training_matches_a_dp_run_without_attribution():
    torch.manual_seed(1)
    dp_plain = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-3)
    plain = _params(_fit_synthetic([], dp=dp_plain))
    torch.manual_seed(1)
    dp_explained = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-3)
    cbs = _explainers()
    explained = _params(_fit_synthetic(cbs, dp=dp_explained))
    for a, b in zip(plain, explained):
        assert torch.equal(a, b)  # same per-sample clipping, same noise: no trace of the extra passes
    assert dp_explained.epsilon_spent == dp_plain.epsilon_spent
    assert dp_explained.report()["steps"] == dp_plain.report()["steps"]
    assert len(cbs[0].history) == 2 and cbs[0].report()["convergence_delta"] is not None
    assert cbs[1].report()["clean_accuracy"] is not None


@pytest.mark.slow
def test_files_and_logger_entries(tmp_path, digits):
    dm = DigitsSubset(digits, n_train=256, n_val=64)
    torch.manual_seed(0)
    attribution = Attribution(  # figures="end": drawn by the final pass, in fit (the default draws at report time)
        num_samples=8,
        method_kwargs={"n_steps": 8},
        sensitivity_samples=2,
        num_heatmaps=8,
        max_overhead=None,
        figures="end",
    )
    robust = AdversarialRobustness(epsilons=[0.0, 0.1], num_samples=32, pgd_steps=2, input_range=[0.0, 1.0])
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer(max_epochs=2, logger=loggers, callbacks=[attribution, robust]).fit(SmallCNN(channels=[4, 8]), dm)

    folder = tmp_path / "csv" / "version_0" / "lightning_trust"
    for name in (
        "importance.csv",
        "importance.json",
        "history.json",
        "attributions.pt",
        "feature_importance.png",
        "heatmaps.png",
        "heatmaps/sample_00.png",
        "heatmaps/sample_07.png",
    ):
        assert (folder / "explain" / name).is_file(), name
    assert not (folder / "robustness" / "robust_accuracy.png").exists()  # figures wait for the report
    assert robust.report()["figures"]["robust_accuracy"] == str(folder / "robustness" / "robust_accuracy.png")
    assert (folder / "robustness" / "robust_accuracy.png").is_file()
    rows = list(csv.DictReader((folder / "explain" / "importance.csv").read_text().splitlines()))
    assert len(rows) == 64 and rows[0]["rank"] == "1" and rows[0]["feature"].startswith("pixel(")
    history = json.loads((folder / "explain" / "history.json").read_text())
    assert [h["stage"] for h in history] == ["validation_end", "fit_end"]  # the end pass redoes the last epoch's
    assert history[-1]["sensitivity_max"] is not None and history[0]["sensitivity_max"] is None
    saved = torch.load(folder / "explain" / "attributions.pt")
    assert torch.equal(saved["attributions"], attribution.last.attributions)
    robustness = json.loads((folder / "robustness" / "robustness.json").read_text())
    assert robustness["last"]["robust_accuracy"]["fgsm"]["0"] == robustness["last"]["clean_accuracy"]

    metrics = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()))
    columns = set(metrics[0])
    for name in (
        "explain/drift",
        "explain/infidelity",
        "explain/convergence_delta",
        "explain/sensitivity_max",
        "robustness/clean_acc",
        "robustness/worst_acc",
        "robustness/fgsm/acc@0.1",
        "robustness/pgd/success@0.1",
    ):
        assert name in columns, name
    assert any(c.startswith("explain/importance/pixel(") for c in columns)
    assert any(row["explain/drift"] for row in metrics)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"explain/heatmaps", "explain/overlays", "explain/feature_importance", "robustness/robust_accuracy"} <= set(
        tags["images"]
    )
    assert {"explain/infidelity", "explain/drift", "robustness/clean_acc"} <= set(tags["scalars"])
    report = attribution.report()
    assert set(report["figures"]) == {"feature_importance", "heatmaps"}
    assert report["method"] == "integrated_gradients" and len(report["top_features"]) == 10


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_numbers(tmp_path):
    def run(max_epochs, ckpt_path=None, root=tmp_path / "a"):
        torch.manual_seed(0)
        model = SGDMLP(input_dim=8, hidden_dims=[16])
        cbs = _explainers()
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, every_n_epochs=1)
        trainer(
            max_epochs=max_epochs, callbacks=[*cbs, checkpoint], enable_checkpointing=True, default_root_dir=root
        ).fit(
            model,
            Synthetic(n=1024, batch_size=64, shuffle=False),
            ckpt_path=ckpt_path,  # a resumable data order
        )
        return cbs

    straight = run(3, root=tmp_path / "straight")
    run(1, root=tmp_path / "resumed")  # "killed" after the first epoch
    resumed = run(3, ckpt_path=str(tmp_path / "resumed" / "last.ckpt"), root=tmp_path / "resumed")
    assert resumed[0].report()["drift_history"] == straight[0].report()["drift_history"]
    a, b = straight[0].report(), resumed[0].report()
    for key in ("top_features", "infidelity", "sensitivity_max", "convergence_delta", "drift"):
        assert a[key] == b[key], key
    assert resumed[1].report()["robust_accuracy"] == straight[1].report()["robust_accuracy"]
    assert len(resumed[1].history) == 3


@pytest.mark.slow
def test_robust_accuracy_equals_clean_at_zero_and_falls_with_epsilon(digits):
    dm = DigitsSubset(digits, n_train=768, n_val=256)
    torch.manual_seed(0)
    model = SmallCNN(channels=[8, 16], lr=0.01)
    robust = AdversarialRobustness(
        epsilons=[0.0, 0.05, 0.15, 0.3],
        num_samples=128,
        pgd_steps=5,
        run_on="fit_end",
        min_perturbation=True,
        min_perturbation_samples=4,
    )
    trainer(max_epochs=4, limit_val_batches=0, callbacks=[robust]).fit(model, dm)
    report = robust.report()
    assert report["clean_accuracy"] > 0.8
    for attack in ("fgsm", "pgd"):
        accs = [report["robust_accuracy"][attack][e] for e in ("0", "0.05", "0.15", "0.3")]
        assert accs[0] == report["clean_accuracy"]
        assert all(a >= b for a, b in itertools.pairwise(accs)) and accs[-1] < accs[0] - 0.2
        assert report["attack_success_rate"][attack]["0"] == 0.0
    assert report["robust_accuracy"]["pgd"]["0.15"] <= report["robust_accuracy"]["fgsm"]["0.15"]
    assert report["worst_accuracy"] == min(min(d.values()) for d in report["robust_accuracy"].values())
    # clean accuracy is the model's own accuracy on the samples attacked (the budget's prefix of the sample)
    index = robust.order[: report["samples"]]
    x, y = robust.sample.inputs[index], robust.sample.targets[index]
    with torch.no_grad():
        assert report["clean_accuracy"] == float((model.eval()(x).argmax(1) == y).float().mean())
    mp = report["min_perturbation"]
    # the search is sized to the budget too: at least one sample, at most the 4 asked for
    assert mp["wanted"] == 4 and 1 <= mp["searched"] <= 4 and (mp["median"] is None or 0 < mp["median"] <= 0.3)


def test_robustness_rejects_bad_configuration():
    with pytest.raises(ValueError, match="`attacks`"):
        AdversarialRobustness(attacks=["cw"])
    with pytest.raises(ValueError, match="`epsilons`"):
        AdversarialRobustness(epsilons=[-0.1])
    with pytest.raises(ValueError, match="`input_range`"):
        AdversarialRobustness(input_range=[1.0, 0.0])


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_complete_with_attribution(tmp_path):
    results = run_ddp(
        """
        from torch.utils.data import DataLoader, Subset
        from lightning_trust.explain import Attribution, AdversarialRobustness

        class Digits(DigitsDataModule):
            def train_dataloader(self):
                return DataLoader(Subset(self.train_dataset, range(256)), batch_size=32, shuffle=True)
            def val_dataloader(self):
                return DataLoader(Subset(self.val_dataset, range(96)), batch_size=32)

        pl.seed_everything(0)
        attribution = Attribution(num_samples=8, method_kwargs={"n_steps": 8}, sensitivity_samples=2, max_overhead=None)
        robust = AdversarialRobustness(epsilons=[0.0, 0.1], num_samples=32, pgd_steps=2)
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, enable_checkpointing=False,
                             callbacks=[attribution, robust],
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(OUT.parent),
                             logger=pl.loggers.CSVLogger(str(OUT.parent), name="logs"))
        model = SmallCNN(channels=[4, 8])
        trainer.fit(model, Digits())
        save_result({"rank": trainer.global_rank, "passes": len(attribution.history), "robust": len(robust.history),
                     "top": attribution.report()["top_features"][:1], "steps": trainer.global_step,
                     "param_sum": float(sum(p.sum() for p in model.parameters()))})
        """,
        tmp_path,
    )
    assert [r["rank"] for r in results] == [0, 1]
    # robustness: the final pass always; the first epoch's only if it leaves a whole final pass in the budget
    assert results[0]["passes"] == 2 and results[0]["robust"] in (1, 2) and results[0]["top"]
    assert results[1]["passes"] == 0 and results[1]["robust"] == 0  # rank zero only
    assert results[0]["steps"] == results[1]["steps"]
    assert results[0]["param_sum"] == pytest.approx(results[1]["param_sum"])
    assert (tmp_path / "logs" / "version_0" / "lightning_trust" / "explain" / "heatmaps.png").is_file()


@pytest.mark.slow
def test_works_on_pruned_and_fake_quantized_models(digits):
    from lightning_trust.compression import ProgressivePruning, QuantizationAwareTraining

    for compression in (ProgressivePruning(), QuantizationAwareTraining(measure_latency=False, compile=False)):
        attribution = Attribution(
            num_samples=8, method_kwargs={"n_steps": 16}, sensitivity_samples=2, figures="never", max_overhead=None
        )
        robust = AdversarialRobustness(epsilons=[0.0, 0.1], num_samples=32, pgd_steps=2)
        torch.manual_seed(0)
        model = SmallCNN(channels=[8, 16])
        trainer(max_epochs=2, callbacks=[compression, attribution, robust]).fit(
            model, DigitsSubset(digits, n_train=256, n_val=64)
        )
        report = attribution.report()
        assert len(attribution.history) == 2 and report["sensitivity_max"] is not None
        assert torch.isfinite(attribution.last.attributions).all() and attribution.last.attributions.abs().sum() > 0
        # completeness holds on the compressed model: the delta is small next to the attributions
        assert report["convergence_delta"] < 0.1 * float(attribution.last.attributions.flatten(1).sum(1).abs().mean())
        assert robust.report()["robust_accuracy"]["fgsm"]["0"] == robust.report()["clean_accuracy"]
