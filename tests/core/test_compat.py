"""The one compatibility checker: declared capabilities, refusals naming both callbacks."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_trust.core import Capability, IncompatibleCallbacksError, TrustCallback, callbacks_with, capabilities_of
from lightning_trust.core.protocol import DuplicateSectionError
from tests.support import trainer


class Private(TrustCallback):
    capabilities = frozenset({Capability.PER_SAMPLE_GRADIENTS, Capability.REPLACES_TRAIN_LOADER})


class Exporter(TrustCallback):
    capabilities = frozenset({Capability.EXPORTED_GRAPH})
    refuses = {Capability.PER_SAMPLE_GRADIENTS: "its graph bypasses the hooked layers; quantize after private training"}


class Probe(TrustCallback):
    report_section = "probe"

    def report(self):
        return {"value": 1.0}


def test_refusal_names_both_callbacks_the_reason_and_the_fix(tmp_path):
    t = trainer(tmp_path, callbacks=[Private(), Exporter()], max_epochs=1)
    with pytest.raises(IncompatibleCallbacksError) as info:
        t.fit(BoringModel())
    message = str(info.value)
    assert message.startswith("Exporter cannot train in the same fit as Private: Private computes per-sample gradients")
    assert "quantize after private training" in message
    assert isinstance(info.value, ValueError) and info.value.capability is Capability.PER_SAMPLE_GRADIENTS
    assert t.global_step == 0


def test_refusals_apply_to_fitting_only(tmp_path):
    t = trainer(tmp_path, callbacks=[Private(), Exporter()], limit_val_batches=2)
    t.validate(BoringModel())  # no training: nothing to refuse


def test_plain_callbacks_and_queries(tmp_path):
    t = trainer(tmp_path, callbacks=[Private(), Callback(), Exporter()], max_epochs=1)
    assert [type(cb) for cb in callbacks_with(t, Capability.PER_SAMPLE_GRADIENTS)] == [Private]
    assert capabilities_of(Callback()) == frozenset()
    assert Capability.EXPORTED_GRAPH in capabilities_of(Exporter())


def test_duplicate_sections_are_refused_before_training_and_names_fix_it(tmp_path):
    t = trainer(tmp_path, callbacks=[Probe(), Probe()], max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(DuplicateSectionError, match="both write the report section 'probe'.*distinct `name`"):
        t.fit(BoringModel())
    t = trainer(tmp_path, callbacks=[Probe(name="probe_a"), Probe()], max_epochs=1, limit_train_batches=2,
                limit_val_batches=0)  # fmt: skip
    t.fit(BoringModel())
    assert [cb.report_name for cb in t.callbacks if isinstance(cb, Probe)] == ["probe_a", "probe"]


def test_names_are_validated():
    with pytest.raises(ValueError, match=r"`name` must be a short identifier.*got 'a.b'"):
        Probe(name="a.b")
