import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from fairlearn.postprocessing import ThresholdOptimizer as FairlearnThresholdOptimizer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_trust.core.compat import IncompatibleCallbacksError
from lightning_trust.demo import TabularMLP
from lightning_trust.fairness import FairnessMetrics, FairnessPenalty, ThresholdOptimizer, ThresholdPredictor
from lightning_trust.fairness.penalty import group_gap
from lightning_trust.fairness.thresholds import PrefitScores
from tests.fairness.helpers import LogitModule, SyntheticDataModule, binary_arrays, names, synthetic
from tests.support import AdultSubset, trainer


def _adult_run(tmp_path, dm, extra, checkpoint=False):
    pl.seed_everything(0)
    metrics = FairnessMetrics("sex", stages=["validation", "test"])
    callbacks = [metrics, *extra] + ([ModelCheckpoint(dirpath=str(tmp_path), save_last=True)] if checkpoint else [])
    t = trainer(tmp_path, callbacks=callbacks, max_epochs=3, enable_checkpointing=checkpoint, deterministic=True)
    model = TabularMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, dm)
        t.test(model, dm, verbose=False)
    return metrics.report(), model


@pytest.fixture(scope="module")
def adult_runs(adult, tmp_path_factory):
    dm = AdultSubset(
        adult, n_train=8000, n_val=None, n_test=5000, batch_size=256, shuffle=True, seed=0, eval_batch_size=1024
    )
    root = tmp_path_factory.mktemp("adult_fair")
    optimizer = ThresholdOptimizer("sex", constraint="demographic_parity")
    base, base_model = _adult_run(root / "none", dm, [optimizer], checkpoint=True)
    penalty = FairnessPenalty("sex", constraint="demographic_parity", lam=3.0)
    fair, _ = _adult_run(root / "penalty", dm, [penalty])
    return {
        "dm": dm,
        "base": base,
        "model": base_model,
        "optimizer": optimizer,
        "penalty": penalty,
        "fair": fair,
        "root": root,
    }


@pytest.mark.slow
def test_penalty_lowers_demographic_parity_on_adult(adult_runs, record_property):
    base, fair = adult_runs["base"], adult_runs["fair"]
    cost = base["overall"]["accuracy"] - fair["overall"]["accuracy"]
    record_property("dp_none", base["demographic_parity_difference"])
    record_property("dp_penalty", fair["demographic_parity_difference"])
    record_property("accuracy_cost_penalty", cost)
    print(
        f"penalty: DP {base['demographic_parity_difference']:.4f} -> {fair['demographic_parity_difference']:.4f}, accuracy cost {cost:.4f}"
    )
    assert base["stage"] == "test" and fair["stage"] == "test"
    assert fair["demographic_parity_difference"] < 0.5 * base["demographic_parity_difference"]
    assert cost < 0.08
    report = adult_runs["penalty"].report()
    assert report["steps"] == 3 * math.ceil(8000 / 256) and report["extra_forwards"] == 0  # TabularMLP calls self(x)
    assert report["penalty_last_epoch"] is not None


@pytest.mark.slow
def test_threshold_optimizer_lowers_demographic_parity_on_adult(adult_runs, record_property):
    report = adult_runs["optimizer"].report()
    before, after = report["before"], report["after"]
    assert report["split"] == "test" and report["by_split"]["validation"]["after"]
    record_property("dp_threshold_optimizer", after["demographic_parity_difference"])
    record_property("accuracy_cost_threshold_optimizer", before["accuracy"] - after["accuracy"])
    print(
        f"threshold optimizer: DP {before['demographic_parity_difference']:.4f} -> {after['demographic_parity_difference']:.4f}, "
        f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}"
    )
    assert after["demographic_parity_difference"] < 0.5 * before["demographic_parity_difference"]
    assert before["accuracy"] - after["accuracy"] < 0.08
    # "before" is the unmitigated model at threshold 0.5: the same numbers FairnessMetrics logged on test
    base = adult_runs["base"]
    assert before["demographic_parity_difference"] == base["demographic_parity_difference"]
    assert before["accuracy"] == base["overall"]["accuracy"]


@pytest.mark.slow
def test_thresholds_equal_fairlearn_and_travel_in_checkpoint(adult_runs):
    dm, model, optimizer = adult_runs["dm"], adult_runs["model"], adult_runs["optimizer"]
    x, y, sex = dm.val.tensors["x"], dm.val.tensors["y"].numpy(), dm.val.tensors["sex"].numpy()
    with torch.no_grad():
        model.eval()
        scores = torch.softmax(model(x), 1)[:, 1].numpy()
    groups = np.array(dm.categories["sex"], dtype=object)[sex]
    reference = FairlearnThresholdOptimizer(
        estimator=PrefitScores(), constraints="demographic_parity", prefit=True, predict_method="predict"
    )
    reference.fit(scores.reshape(-1, 1), y, sensitive_features=groups)
    for group, bunch in reference.interpolated_thresholder_.interpolation_dict.items():
        saved = optimizer.thresholds[group]
        assert saved["p0"] == bunch.p0 and saved["operation0"] == [
            bunch.operation0.operator,
            bunch.operation0.threshold,
        ]
        assert saved["p1"] == bunch.p1 and saved["operation1"] == [
            bunch.operation1.operator,
            bunch.operation1.threshold,
        ]
    predictor = ThresholdPredictor.from_checkpoint(str(adult_runs["root"] / "none" / "last.ckpt"))
    assert predictor.thresholds == optimizer.thresholds
    batch = {k: v[:500] for k, v in dm.val.tensors.items()}
    fair = predictor.predict(model, batch, random_state=3).numpy()
    expected = reference.predict(scores[:500].reshape(-1, 1), sensitive_features=groups[:500], random_state=3)
    assert np.array_equal(fair, expected)
    with pytest.raises(ValueError, match="no fitted threshold"):
        predictor.predict_scores(scores[:2], np.array(["Other", "Male"], dtype=object))


def test_group_gap_matches_numpy_and_has_gradient():
    torch.manual_seed(0)
    logits = torch.randn(40, 1, requires_grad=True)
    p = torch.sigmoid(logits)
    codes = torch.randint(0, 3, (40,))
    y = torch.randint(0, 2, (40,))
    gap = group_gap(p, codes, 4)  # group 3 absent: skipped
    means = [p[codes == g].mean().item() for g in range(3)]
    assert gap.item() == pytest.approx(max(means) - min(means), rel=1e-6)
    gap.backward()
    assert logits.grad.abs().sum() > 0
    mask = (y == 1).float().reshape(-1, 1)
    pos = [p[(codes == g) & (y == 1)].mean().item() for g in range(3)]
    assert group_gap(p, codes, 3, mask).item() == pytest.approx(max(pos) - min(pos), rel=1e-6)
    assert group_gap(p, torch.zeros(40, dtype=torch.long), 2).item() == 0.0  # one group: no penalty


def test_penalty_value_and_patch_restored(tmp_path):
    data = synthetic(n=256)
    penalty = FairnessPenalty(["sex", "race"], constraint="equalized_odds", lam=1.0)
    module = LogitModule(direct_forward=True)  # calls self.forward: the hook sees nothing, one extra forward
    t = trainer(tmp_path, callbacks=[penalty], max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    t.fit(module, SyntheticDataModule(data))
    assert "training_step" not in module.__dict__
    assert penalty.steps == 2 and penalty.extra_forwards == 2
    # the value on a batch equals the equalized-odds gap of the positive probability over sex x race
    batch = {k: v[:64] for k, v in data.items()}
    p = torch.softmax(batch["x"] * module.scale.detach(), 1)[:, 1]
    g = batch["sex"] * 3 + batch["race"]
    gaps = []
    for label in (1, 0):
        means = [
            p[(g == k) & (batch["y"] == label)].mean().item()
            for k in range(6)
            if ((g == k) & (batch["y"] == label)).any()
        ]
        gaps.append(max(means) - min(means))
    with torch.no_grad():
        assert penalty.penalty(module(batch["x"]), batch).item() == pytest.approx(max(gaps), rel=1e-5)


def test_penalty_warmup_epochs(tmp_path):
    penalty = FairnessPenalty("sex", warmup_epochs=1)
    trainer(tmp_path, callbacks=[penalty], max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(
        LogitModule(), SyntheticDataModule(synthetic(n=128))
    )
    assert penalty.steps == 2 and [h["epoch"] for h in penalty.report()["history"]] == [1]


def test_penalty_changes_the_loss_gradient(tmp_path):
    data = synthetic(n=128)
    grads = {}
    for lam in (0.0, 5.0):
        module = LogitModule()
        t = trainer(
            tmp_path,
            callbacks=[FairnessPenalty("sex", lam=lam)],
            max_epochs=1,
            limit_train_batches=1,
            limit_val_batches=0,
        )
        t.fit(module, SyntheticDataModule(data))
        grads[lam] = module.scale.item()
    assert grads[0.0] != grads[5.0]


def test_penalty_refuses_differential_privacy(tmp_path):
    from lightning_trust.privacy import DifferentialPrivacy

    t = trainer(
        tmp_path,
        callbacks=[FairnessPenalty("sex"), DifferentialPrivacy(noise_multiplier=1.0)],
        max_epochs=1,
        limit_train_batches=1,
    )
    with pytest.raises(IncompatibleCallbacksError, match="differential privacy.*DP guarantee"):
        t.fit(LogitModule(), SyntheticDataModule(synthetic(n=64)))


def test_penalty_refuses_manual_optimization(tmp_path):
    module = LogitModule()
    module.automatic_optimization = False
    with pytest.raises(RuntimeError, match="manual optimization"):
        trainer(tmp_path, callbacks=[FairnessPenalty("sex")], max_epochs=1, limit_train_batches=1).fit(
            module, SyntheticDataModule(synthetic(n=64))
        )


def test_threshold_optimizer_without_validation_scores_again(tmp_path):
    data = synthetic(n=400)
    optimizer = ThresholdOptimizer("sex", constraint="equalized_odds")
    module = LogitModule()
    t = trainer(tmp_path, callbacks=[optimizer], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    t.fit(module, SyntheticDataModule(data))
    scores = torch.softmax(data["x"] * module.scale.detach(), 1)[:, 1].numpy()
    reference = ThresholdOptimizer("sex", constraint="equalized_odds")
    reference.fit_arrays(scores, binary_arrays(data)[0], names(data, "sex"))
    assert optimizer.thresholds == reference.thresholds
    assert optimizer.report()["fitted_on"]["samples"] == 400


def test_threshold_optimizer_needs_fit_before_test(tmp_path):
    with pytest.raises(RuntimeError, match="no fitted thresholds"):
        trainer(tmp_path, callbacks=[ThresholdOptimizer("sex")]).test(
            LogitModule(), SyntheticDataModule(synthetic(n=64)), verbose=False
        )


def test_bad_mitigation_arguments():
    with pytest.raises(ValueError, match="constraint"):
        FairnessPenalty(constraint="parity")
    with pytest.raises(ValueError, match="lam"):
        FairnessPenalty(lam=-1.0)
    with pytest.raises(ValueError, match="constraint"):
        ThresholdOptimizer(constraint="fair")
    with pytest.raises(ValueError, match="objective"):
        ThresholdOptimizer(objective="f1")


def test_metrics_and_threshold_optimizer_compose_with_differential_privacy(tmp_path):
    from fairlearn.metrics import demographic_parity_difference

    from lightning_trust.privacy import DifferentialPrivacy

    data = synthetic(n=256)
    metrics, optimizer = FairnessMetrics("sex", min_group_size=0), ThresholdOptimizer("sex")
    module = LogitModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(
            tmp_path,
            callbacks=[DifferentialPrivacy(noise_multiplier=1.0, dataset_size=256), metrics, optimizer],
            max_epochs=2,
        ).fit(module, SyntheticDataModule(data))
    y_true, y_pred = binary_arrays({**data, "x": data["x"] * module.scale.detach()})
    expected = demographic_parity_difference(y_true, y_pred, sensitive_features=names(data, "sex"))
    assert metrics.report()["demographic_parity_difference"] == expected
    report = optimizer.report()
    assert report["before"]["demographic_parity_difference"] == expected
    assert report["after"]["demographic_parity_difference"] < expected


def test_threshold_optimizer_checkpoint_resume(tmp_path):
    data = synthetic(n=300)

    def run(root, epochs, ckpt=None):
        # two mitigations in one Trainer: distinct report sections
        optimizer, penalty = ThresholdOptimizer("sex", name="fairness_thresholds"), FairnessPenalty("sex", lam=0.5)
        mc = ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        t = trainer(root, callbacks=[optimizer, penalty, mc], max_epochs=epochs, enable_checkpointing=True)
        t.fit(LogitModule(), SyntheticDataModule(data), ckpt_path=ckpt)
        return optimizer, penalty

    full, full_penalty = run(tmp_path / "full", 2)
    part, _ = run(tmp_path / "part", 1)
    # each checkpoint carries the thresholds fitted on its own weights
    assert ThresholdPredictor.from_checkpoint(str(tmp_path / "part" / "epoch=0.ckpt")).thresholds == part.thresholds
    resumed, resumed_penalty = run(tmp_path / "resumed", 2, ckpt=str(tmp_path / "part" / "epoch=0.ckpt"))
    assert resumed.thresholds == full.thresholds and resumed.report()["by_split"] == full.report()["by_split"]
    assert resumed_penalty.report()["history"] == full_penalty.report()["history"]
