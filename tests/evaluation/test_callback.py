"""CrossDomainEvaluation in real Lightning runs: per-domain numbers against scikit-learn/torchmetrics on
the filtered arrays, extra domains, corruptions, errors, logging, files and checkpoint resume."""

import json
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_trust.core.batch import BatchKeyError
from lightning_trust.core.protocol import Reportable
from lightning_trust.demo import SmallCNN, TabularMLP
from lightning_trust.evaluation import CrossDomainEvaluation, DomainSubset
from tests.evaluation.helpers import probabilities, reference_metrics
from tests.support import trainer

METRICS = ["accuracy", "f1", "auroc", "nll", "ece"]


@contextmanager
def _keeps_determinism():
    """A module-scoped fixture runs before conftest's per-test restore takes its snapshot, so its
    Trainer(deterministic=True) would leave torch's global determinism on for the rest of the session
    (breaking e.g. Captum's DeepLift through MaxPool in later tests): restore it here."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(scope="module")
def adult_model(adult):
    """A TabularMLP trained for a few steps (so f1/auroc are not degenerate)."""
    pl.seed_everything(0)
    model = TabularMLP()
    with _keeps_determinism():
        trainer(Path("/tmp"), [], max_epochs=1, limit_train_batches=30, limit_val_batches=0).fit(model, adult)
    return model


@pytest.fixture(scope="module")
def digits_model(digits):
    pl.seed_everything(0)
    model = SmallCNN(channels=[16, 32], lr=0.01)
    with _keeps_determinism():
        trainer(Path("/tmp"), [], max_epochs=6, limit_val_batches=0).fit(model, digits)
    return model


def test_per_domain_metrics_equal_sklearn_on_filtered_arrays(adult, adult_model, tmp_path):
    # a small buffer makes several flushes per pass; in_domain given by name
    cb = CrossDomainEvaluation(
        domain_key="native_region", in_domain=["United-States"], metrics=METRICS, buffer_size=700
    )
    t = trainer(tmp_path, [cb])
    t.validate(adult_model, datamodule=adult, verbose=False)
    report = cb.report()
    assert isinstance(cb, Reportable) and report["stage"] == "validate"
    val = adult.val_dataset.tensors
    probs = probabilities(adult_model, val["x"])
    target, region = val["y"].numpy(), val["native_region"].numpy()
    names = adult.categories["native_region"]
    assert report["domains"] == names
    for code, name in enumerate(names):
        mask = region == code
        assert report["sizes"][name] == int(mask.sum())
        expected = reference_metrics(probs[mask], target[mask])
        for metric, value in expected.items():
            assert report["per_domain"][name][metric] == pytest.approx(value, abs=1e-5), (name, metric)
    # summaries from the per-domain numbers
    acc = {n: report["per_domain"][n]["accuracy"] for n in names}
    assert report["average"]["accuracy"] == pytest.approx(np.mean(list(acc.values())))
    assert report["weighted_average"]["accuracy"] == pytest.approx(float((probs.argmax(1) == target).mean()), abs=1e-6)
    assert report["worst"]["accuracy"] == min(acc.values())
    assert report["worst_domain"]["accuracy"] == min(acc, key=acc.get)
    ood = np.mean([acc[n] for n in names if n != "United-States"])
    assert report["in_domain"]["accuracy"] == pytest.approx(acc["United-States"])
    assert report["ood_gap"]["accuracy"] == pytest.approx(acc["United-States"] - ood)
    # logged, tabulated
    assert float(t.callback_metrics["domain/United-States/accuracy"]) == pytest.approx(acc["United-States"], abs=1e-6)
    assert float(t.callback_metrics["domain/summary/ood_gap/accuracy"]) == pytest.approx(report["ood_gap"]["accuracy"])
    csv_text = Path(report["tables"]["csv"]).read_text()
    assert csv_text.startswith("domain,split,samples,accuracy,f1,auroc,nll,ece") and "Latin-America" in csv_text
    assert "| United-States | in-domain |" in Path(report["tables"]["markdown"]).read_text()
    json.dumps(report)  # plain JSON


def test_in_domain_by_code_and_names_agree_and_unknown_values_fail(adult, adult_model, tmp_path):
    by_code = CrossDomainEvaluation(domain_key="native_region", in_domain=[0], metrics=["accuracy"], figures=False)
    trainer(tmp_path, [by_code]).validate(adult_model, datamodule=adult, verbose=False)
    assert by_code.report()["in_domain_domains"] == ["United-States"]
    bad = CrossDomainEvaluation(domain_key="native_region", in_domain=["Mars"], metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"'Mars' is not a domain.*'United-States' \(code 0\)"):
        trainer(tmp_path, [bad]).validate(adult_model, datamodule=adult, verbose=False)


def test_extra_domains_from_method_name_and_dataset(adult, adult_model, tmp_path):
    subset = DomainSubset(adult.test_dataset, "native_region", keep=[2])  # Asia in the test split
    cb = CrossDomainEvaluation(
        domain_key="native_region", metrics=["accuracy", "nll"], figures=False,
        domains={"test_split": "test_dataloader", "test_asia": subset}, batch_size=500,
    )  # fmt: skip
    trainer(tmp_path, [cb]).validate(adult_model, datamodule=adult, verbose=False)
    report = cb.report()
    test = adult.test_dataset.tensors
    probs = probabilities(adult_model, test["x"])
    target = test["y"].numpy()
    assert report["sizes"]["test_split"] == len(target)
    for name, mask in (("test_split", slice(None)), ("test_asia", test["native_region"].numpy() == 2)):
        expected = reference_metrics(probs[mask], target[mask])
        assert report["per_domain"][name]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert report["per_domain"][name]["nll"] == pytest.approx(expected["nll"], abs=1e-5)
    # the side-column domains count as in-domain when extra domains exist
    assert report["in_domain_domains"] == adult.categories["native_region"]
    assert report["ood_domains"] == ["test_split", "test_asia"]


def test_tuple_batches_with_a_domain_position_and_an_empty_domain(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 5, generator=g), torch.randint(0, 3, (120,), generator=g)
    domain = torch.arange(120) % 3  # values 0, 1, 2; value 7 never occurs
    model = torch.nn.Linear(5, 3)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs)

        def validation_step(self, batch, batch_idx):
            return {"logits": self(batch[0])}

    loader = DataLoader(TensorDataset(x, y, domain), batch_size=32)
    cb = CrossDomainEvaluation(domain_key="site", domain_values=[0, 1, 2, 7], in_domain=[0], metrics=["accuracy", "nll"],
                               batch_keys={"site": 2}, figures=False)  # fmt: skip
    with pytest.warns(UserWarning, match=r"domain\(s\) \['7'\] had no samples"):
        trainer(tmp_path, [cb]).validate(Module(), dataloaders=loader, verbose=False)
    report = cb.report()
    assert report["empty_domains"] == ["7"] and report["per_domain"]["7"] == {"accuracy": None, "nll": None}
    probs = probabilities(model, x)
    for code in range(3):
        expected = reference_metrics(probs[domain.numpy() == code], y.numpy()[domain.numpy() == code])
        assert report["per_domain"][str(code)]["accuracy"] == pytest.approx(expected["accuracy"])
        assert report["per_domain"][str(code)]["nll"] == pytest.approx(expected["nll"], abs=1e-5)
    assert report["ood_domains"] == ["1", "2", "7"]
    # the empty domain is left out of the summaries
    assert report["ood"]["accuracy"] == pytest.approx(np.mean([report["per_domain"][d]["accuracy"] for d in "12"]))


def test_unknown_domain_key_lists_the_batch_keys(adult, adult_model, tmp_path):
    cb = CrossDomainEvaluation(domain_key="country", domain_values=[0, 1], metrics=["accuracy"])
    with pytest.raises(
        BatchKeyError, match=r"domain_key='country'.*'x', 'y', 'sex', 'race', 'age_group', 'native_region'"
    ):
        trainer(tmp_path, [cb]).validate(adult_model, datamodule=adult, verbose=False)


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="no domains"):
        CrossDomainEvaluation()
    with pytest.raises(ValueError, match="Unknown metric 'acc'"):
        CrossDomainEvaluation(domain_key="native_region", metrics=["acc"])
    with pytest.raises(ValueError, match="Unknown corruption"):
        CrossDomainEvaluation(corruptions=["fog"])
    with pytest.raises(ValueError, match="severities"):
        CrossDomainEvaluation(corruptions="all", severities=[0, 6])
    with pytest.raises(ValueError, match="baseline_errors"):
        CrossDomainEvaluation(domain_key="native_region", baseline_errors="x.json")
    with pytest.raises(ValueError, match="metric_args"):
        CrossDomainEvaluation(domain_key="native_region", metrics=["ece"], metric_args={"nll": {}})
    with pytest.raises(ValueError, match="every_n_epochs"):
        CrossDomainEvaluation(domain_key="native_region", every_n_epochs=0)


def test_corruptions_error_grows_with_severity_and_baseline_normalizes(digits, digits_model, tmp_path):
    cb = CrossDomainEvaluation(corruptions="all", severities=[1, 3, 5], metrics=["accuracy", "ece"], figures=False)
    trainer(tmp_path, [cb]).validate(digits_model, datamodule=digits, verbose=False)
    report = cb.report()
    images, labels = digits.val_dataset.tensors
    clean = reference_metrics(probabilities(digits_model, images), labels.numpy())
    assert report["per_domain"]["clean"]["accuracy"] == pytest.approx(clean["accuracy"], abs=1e-6)
    assert report["in_domain_domains"] == ["clean"] and len(report["ood_domains"]) == 9 * 3
    corruption = report["corruption"]
    assert corruption["clean_error"] == pytest.approx(1 - clean["accuracy"], abs=1e-6)
    for name, errors in corruption["errors"].items():
        assert errors["5"] > errors["1"], name  # a trained model fails more at higher severity
    mean_by_severity = [np.mean([e[s] for e in corruption["errors"].values()]) for s in ("1", "3", "5")]
    assert mean_by_severity[0] < mean_by_severity[1] < mean_by_severity[2]
    assert report["corruption_error"] == pytest.approx(
        np.mean([v["ce"] for v in corruption["per_corruption"].values()])
    )
    assert float(report["per_domain"]["contrast_s5"]["accuracy"]) == pytest.approx(
        1 - corruption["errors"]["contrast"]["5"]
    )
    # the same model as its own baseline: CE = relative CE = 1 (and the corruption noise is seeded)
    baseline = report["tables"]["corruption_errors"]
    again = CrossDomainEvaluation(corruptions="all", severities=[1, 3, 5], metrics=["accuracy"], baseline_errors=baseline,
                                  figures=False)  # fmt: skip
    trainer(tmp_path / "again", [again]).validate(digits_model, datamodule=digits, verbose=False)
    assert again.report()["corruption"]["normalized"] is True
    assert again.report()["corruption_error"] == pytest.approx(1.0)
    assert again.report()["relative_corruption_error"] == pytest.approx(1.0)


class Recorder(Callback):
    """A Pausable callback: records whether extra passes ran with it paused, like DP hooks would."""

    def __init__(self):
        self.paused_calls = 0
        self.is_paused = False

    def paused(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.is_paused, self.paused_calls = True, self.paused_calls + 1
            try:
                yield
            finally:
                self.is_paused = False

        return ctx()


def test_fit_every_n_epochs_figures_logs_and_pauses_other_callbacks(adult, tmp_path):
    pl.seed_everything(0)
    recorder = Recorder()
    cb = CrossDomainEvaluation(domain_key="native_region", in_domain=["United-States"], every_n_epochs=2,
                               metrics=["accuracy", "ece"], domains={"test_split": "test_dataloader"})  # fmt: skip
    t = trainer(tmp_path, [cb, recorder], max_epochs=3, limit_train_batches=10, num_sanity_val_steps=2,
                logger=pl.loggers.CSVLogger(tmp_path, name=""))  # fmt: skip
    t.fit(TabularMLP(), adult)
    assert [h["epoch"] for h in cb.history] == [1, 2]  # epoch 2 (every 2nd) and the last one
    assert recorder.paused_calls >= 1  # the extra domain ran inside isolated_eval
    # before a rate is measured only the last epoch's pass runs the extra domain (the budget's rule)
    assert [h["extra_passes"] for h in cb.history] == ["skipped", "run"]
    report = cb.report()
    for key in ("domain_accuracy", "domain_ece", "reliability_United-States", "reliability_test_split"):
        assert Path(report["figures"][key]).stat().st_size > 1000
    metrics_csv = (Path(t.log_dir) / "metrics.csv").read_text()
    assert "domain/Asia/accuracy" in metrics_csv and "domain/summary/worst/ece" in metrics_csv
    # test: the report switches to the test pass and keeps the validation one
    t.test(t.lightning_module, datamodule=adult, verbose=False)
    report = cb.report()
    assert report["stage"] == "test" and report["sizes"]["United-States"] == int(
        (adult.test_dataset.tensors["native_region"] == 0).sum()
    )
    assert "validation" in report and Path(report["figures"]["domain_accuracy_test"]).exists()


def test_resume_from_checkpoint_gives_the_same_numbers(adult, tmp_path):
    # unshuffled loaders, so that the resumed run trains on the same batches as the straight one
    train = DataLoader(torch.utils.data.Subset(adult.train_dataset, range(2048)), batch_size=256)
    val = DataLoader(adult.val_dataset, batch_size=512)

    def run(root, max_epochs, ckpt=None):
        pl.seed_everything(0)
        cb = CrossDomainEvaluation(domain_key="native_region", domain_values=[0, 1, 2, 3, 4], in_domain=[0],
                                   metrics=["accuracy", "nll"], figures=False)  # fmt: skip
        ckpt_cb = ModelCheckpoint(dirpath=root, save_last=True)
        t = trainer(root, [cb, ckpt_cb], max_epochs=max_epochs, enable_checkpointing=True, deterministic=True,
                    num_sanity_val_steps=2)  # fmt: skip
        t.fit(TabularMLP(), train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt)
        return cb

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 3, ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]  # the first two came from the checkpoint
    assert resumed.history == straight.history
    assert resumed.report()["per_domain"] == straight.report()["per_domain"]
