"""The fairness callbacks' protocol: warnings once per run, report names, declared capabilities,
and the declared logged/report keys against real runs."""

import re
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from opacus import GradSampleModule

from lightning_trust.core.compat import Capability, IncompatibleCallbacksError
from lightning_trust.core.protocol import DuplicateSectionError, collect_reports
from lightning_trust.fairness import FairnessMetrics, FairnessPenalty, ThresholdOptimizer
from tests.fairness.helpers import LogitModule, SyntheticDataModule, synthetic
from tests.support import trainer


class Recording(Logger):
    """Keeps the name of every metric logged through Lightning's loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Any = None) -> None:
        self.keys.update(metrics)


def _pattern(declared: str) -> re.Pattern:
    parts = re.split(r"<[^>]+>", declared)
    return re.compile(".+".join(re.escape(p) for p in parts) + r"\Z")


def _check_declared(callback: Any, logged: set[str]) -> None:
    report = callback.report()
    keys = set(report) - {"figures"}
    declared = set(callback.report_keys)
    assert keys == declared, (sorted(keys - declared), sorted(declared - keys))
    patterns = [_pattern(k) for k in callback.logged_keys]
    undeclared = sorted(k for k in logged if k != "epoch" and not any(p.match(k) for p in patterns))
    assert not undeclared


def _messages(record: list, text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


def test_small_group_and_breach_warn_once_per_run(tmp_path):
    cb = FairnessMetrics("race", min_group_size=70, thresholds={"demographic_parity_difference": 0.01})
    logger = Recording()
    t = trainer(tmp_path, callbacks=[cb], logger=logger, max_epochs=3, limit_train_batches=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t.fit(LogitModule(), SyntheticDataModule(synthetic(n=200)))
    assert t.current_epoch == 3 and len(cb.report()["breaches"]) == 3  # every epoch breached
    assert all(f["metric"] == "count" for f in cb.report()["flags"])  # and had a small group
    assert len(_messages(record, "flagged group number")) == 1
    assert len(_messages(record, "Fairness limit breached")) == 1
    assert {"fairness/flagged", "fairness/breaches"} <= logger.keys  # the per-epoch counts are logged instead
    # a new run warns again
    with pytest.warns(UserWarning, match="Fairness limit breached"):
        t.validate(LogitModule(), SyntheticDataModule(synthetic(n=200)), verbose=False)


def test_two_unnamed_fairness_metrics_are_refused_before_training(tmp_path):
    module = LogitModule()
    t = trainer(tmp_path, callbacks=[FairnessMetrics("sex"), FairnessMetrics("race")], max_epochs=1)
    with pytest.raises(DuplicateSectionError, match="`name`"):
        t.fit(module, SyntheticDataModule(synthetic(n=64)))
    assert t.global_step == 0 and module.scale.item() == 1.0


def test_two_named_fairness_metrics_write_both_sections(tmp_path):
    by_sex = FairnessMetrics("sex", min_group_size=0, name="fairness_sex")
    by_race = FairnessMetrics("race", min_group_size=0, name="fairness_race")
    logger = Recording()
    t = trainer(tmp_path, callbacks=[by_sex, by_race], logger=logger, max_epochs=1, limit_train_batches=1)
    t.fit(LogitModule(), SyntheticDataModule(synthetic(n=128)))
    reports = collect_reports(t)
    assert set(reports) == {"fairness_sex", "fairness_race"}
    assert set(reports["fairness_sex"]["by_group"]) == {"sex"} and set(reports["fairness_race"]["by_group"]) == {"race"}
    assert {"fairness_sex/demographic_parity_difference", "fairness_race/demographic_parity_difference"} <= logger.keys
    assert "fairness_sex/selection_rate/sex=Female" in logger.keys
    assert "fairness_race/selection_rate/race=A" in logger.keys
    assert by_sex.files["table_validation"] != by_race.files["table_validation"]
    assert by_sex.state_key != by_race.state_key


def test_fairness_metrics_declared_keys_match_a_real_run(tmp_path):
    cb = FairnessMetrics(["sex", ["sex", "race"]], stages=["validation", "test"],
                         thresholds={"demographic_parity_difference": 0.01})  # fmt: skip
    logger = Recording()
    t = trainer(tmp_path, callbacks=[cb], logger=logger, max_epochs=2, limit_train_batches=1)
    dm, module = SyntheticDataModule(synthetic(n=256)), LogitModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, dm)
        t.test(module, dm, verbose=False)
    _check_declared(cb, logger.keys)
    assert any(k.startswith("fairness_test/") for k in logger.keys)
    assert any(k.startswith("fairness/selection_rate/sex=") for k in logger.keys)


def test_mitigation_declared_keys_match_a_real_run(tmp_path):
    penalty, optimizer = FairnessPenalty("sex", lam=0.5), ThresholdOptimizer("sex", name="fairness_thresholds")
    logger = Recording()
    t = trainer(tmp_path, callbacks=[penalty, optimizer], logger=logger, max_epochs=2, limit_train_batches=2,
                log_every_n_steps=1)  # fmt: skip
    dm, module = SyntheticDataModule(synthetic(n=256)), LogitModule()
    t.fit(module, dm)
    t.test(module, dm, verbose=False)
    assert {"fairness_penalty/value_step", "fairness_penalty/value_epoch"} <= logger.keys
    _check_declared(penalty, logger.keys)
    _check_declared(optimizer, set())


def test_declared_capabilities():
    assert FairnessPenalty.capabilities == {Capability.ADDS_LOSS_TERM}
    assert set(FairnessPenalty.refuses) == {Capability.PER_SAMPLE_GRADIENTS}
    assert Capability.EXTRA_PASSES in ThresholdOptimizer.capabilities
    assert not FairnessMetrics.refuses and not ThresholdOptimizer.refuses


class _PerSampleGradients(Callback):
    capabilities = frozenset({Capability.PER_SAMPLE_GRADIENTS})


def test_penalty_refuses_any_per_sample_gradient_callback(tmp_path):
    module = LogitModule()
    t = trainer(tmp_path, callbacks=[_PerSampleGradients(), FairnessPenalty("sex")], max_epochs=1)
    with pytest.raises(IncompatibleCallbacksError, match="FairnessPenalty.*_PerSampleGradients.*DP guarantee"):
        t.fit(module, SyntheticDataModule(synthetic(n=64)))
    assert "training_step" not in module.__dict__


def test_penalty_refuses_an_opacus_wrapped_module(tmp_path):
    class Wrapped(LogitModule):
        def __init__(self):
            super().__init__()
            self.head = GradSampleModule(torch.nn.Linear(2, 2))

    with pytest.raises(RuntimeError, match="Opacus-wrapped.*DP guarantee"):
        trainer(tmp_path, callbacks=[FairnessPenalty("sex")], max_epochs=1).fit(
            Wrapped(), SyntheticDataModule(synthetic(n=64))
        )
    # DDP / DataParallel wrappers are no reason to refuse
    plain = LogitModule()
    plain.head = torch.nn.DataParallel(torch.nn.Linear(2, 2))
    trainer(tmp_path, callbacks=[FairnessPenalty("sex")], max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        plain, SyntheticDataModule(synthetic(n=64)))  # fmt: skip
