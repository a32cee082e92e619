"""The declared ``logged_keys``/``report_keys`` of the explain callbacks against a real run, and what
they declare to the compatibility check."""

import csv
import re

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_trust.core import Capability, DuplicateSectionError, section_names
from lightning_trust.demo import TabularMLP
from lightning_trust.explain import AdversarialRobustness, Attribution
from tests.explain.helpers import Synthetic
from tests.support import trainer


def _matches(name, patterns):
    """Whether ``name`` fits one of the declared names (a ``<placeholder>`` matches any text)."""
    return any(re.fullmatch(re.sub(r"<[^>]+>", ".+", re.escape(p)), name)
               for p in patterns)  # fmt: skip


def _logged(log_dir, prefix):
    with open(log_dir / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    return [c for c in columns if c.startswith(prefix)]


def test_declared_keys_match_a_real_run(tmp_path):
    torch.manual_seed(0)
    attribution = Attribution(
        num_samples=16, infidelity_samples=2, sensitivity_samples=2, figures="every", top_k=3, max_overhead=None
    )
    robust = AdversarialRobustness(epsilons=[0.0, 3.0], num_samples=32, pgd_steps=2, min_perturbation=True,
                                   min_perturbation_samples=2)  # fmt: skip
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [attribution, robust], max_epochs=2, logger=logger).fit(
        TabularMLP(input_dim=8, hidden_dims=[16], lr=0.05), Synthetic(n=1024)
    )
    log_dir = tmp_path / "csv" / "version_0"
    for callback, prefix in ((attribution, "explain/"), (robust, "robustness/")):
        report = callback.report()
        keys = set(report) - {"figures"}
        assert keys == set(callback.report_keys), type(callback).__name__
        assert report["figures"]
        logged = _logged(log_dir, prefix)
        assert logged, prefix
        unknown = [name for name in logged if not _matches(name, callback.logged_keys)]
        assert not unknown, unknown
        # every declared metric was logged at least once in this run
        for pattern in callback.logged_keys:
            assert any(_matches(name, [pattern]) for name in logged), pattern


def test_capabilities_and_names():
    for callback in (Attribution(), AdversarialRobustness()):
        assert Capability.EXTRA_PASSES in callback.capabilities and not callback.refuses
    assert Attribution(name="explain_val").report_name == "explain_val"

    class T:
        callbacks = [Attribution(), Attribution()]

    with pytest.raises(DuplicateSectionError, match="distinct `name`"):
        section_names(T())
    T.callbacks = [Attribution(), Attribution(name="explain_test", run_on="test_end")]
    assert sorted(section_names(T())) == ["explain", "explain_test"]
