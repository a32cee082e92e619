"""The declared ``logged_keys``/``report_keys`` of CrossDomainEvaluation against a real run, and what it
declares to the compatibility check."""

import csv
import re

import lightning.pytorch as pl
import pytest

from lightning_trust.core import Capability, DuplicateSectionError, section_names
from lightning_trust.demo import SmallCNN
from lightning_trust.evaluation import CrossDomainEvaluation
from tests.explain.helpers import DigitsSubset
from tests.support import trainer


def _matches(name, patterns):
    """Whether ``name`` fits one of the declared names (a ``<placeholder>`` matches any text)."""
    return any(re.fullmatch(re.sub(r"<[^>]+>", ".+", re.escape(p)), name) for p in patterns)


def test_declared_keys_match_a_real_run(digits, tmp_path):
    pl.seed_everything(0)
    dm = DigitsSubset(digits, n_train=256, n_val=128)
    cb = CrossDomainEvaluation(corruptions=["gaussian_noise", "contrast"], severities=[1, 5], domains={"train": dm.train},
                               metrics=["accuracy", "ece"])  # fmt: skip
    t = trainer(tmp_path, [cb], max_epochs=1, logger=pl.loggers.CSVLogger(tmp_path, name="csv"))
    t.fit(SmallCNN(channels=[4, 8]), dm)
    t.test(t.lightning_module, datamodule=dm, verbose=False)
    report = cb.report()
    assert set(report) - {"figures"} == set(cb.report_keys)  # every key declared, every declared key there
    assert report["figures"]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        logged = [c for c in next(csv.reader(handle)) if c.startswith("domain/")]
    unknown = [name for name in logged if not _matches(name, cb.logged_keys)]
    assert logged and not unknown, unknown
    for pattern in cb.logged_keys:
        assert any(_matches(name, [pattern]) for name in logged), pattern
    # before any pass the report says so, with declared keys only
    fresh = CrossDomainEvaluation(corruptions=["blur"]).report()
    assert fresh["evaluated"] is False and set(fresh) - {"figures"} <= set(cb.report_keys)


def test_capabilities_depend_on_the_extra_passes():
    assert Capability.EXTRA_PASSES not in CrossDomainEvaluation(domain_key="native_region").capabilities
    assert Capability.EXTRA_PASSES in CrossDomainEvaluation(corruptions=["blur"]).capabilities
    assert Capability.EXTRA_PASSES in CrossDomainEvaluation(domains={"test": "test_dataloader"}).capabilities
    assert not CrossDomainEvaluation(corruptions=["blur"]).refuses

    class T:
        callbacks = [CrossDomainEvaluation(domain_key="sex"), CrossDomainEvaluation(domain_key="race")]

    with pytest.raises(DuplicateSectionError, match="distinct `name`"):
        section_names(T())
    T.callbacks[1] = CrossDomainEvaluation(domain_key="race", name="evaluation_race")
    assert sorted(section_names(T())) == ["evaluation", "evaluation_race"]
