"""`trained_epoch`: the epoch index a pass sees is the same at the last validation, at fit end and in a test after fit."""

import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_trust.core.seam import trained_epoch
from tests.support import trainer


class Record(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def _note(self, hook: str, t: pl.Trainer) -> None:
        self.seen.append((hook, t.current_epoch, trained_epoch(t)))

    def on_validation_epoch_end(self, t, m):
        if not t.sanity_checking:
            self._note("validation", t)

    def on_fit_end(self, t, m):
        self._note("fit_end", t)

    def on_test_epoch_end(self, t, m):
        self._note("test", t)


def test_trained_epoch_is_the_last_epoch_index_at_every_hook(tmp_path):
    record = Record()
    t = trainer(tmp_path, [record], max_epochs=3, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
    t.fit(BoringModel())
    t.test(BoringModel(), verbose=False)
    # Lightning's current_epoch moves from 2 (last validation) to 3 (fit end, test); the trained epoch stays 2
    assert record.seen == [
        ("validation", 0, 0),
        ("validation", 1, 1),
        ("validation", 2, 2),
        ("fit_end", 3, 2),
        ("test", 3, 2),
    ]


def test_trained_epoch_without_a_fit_is_current_epoch(tmp_path):
    record = Record()
    t = trainer(tmp_path, [record], limit_test_batches=1)
    t.test(BoringModel(), verbose=False)
    assert record.seen == [("test", 0, 0)]
    assert trained_epoch(object()) == 0
