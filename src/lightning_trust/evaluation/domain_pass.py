"""What :class:`~lightning_trust.evaluation.CrossDomainEvaluation` evaluates in the stage's own pass:
this run's domains (side-column values or the base domain, extra domains, corrupted copies, which
are in-domain, their metrics) and the scoring of each batch the stage evaluates into its domain,
reusing the step's own forward (:class:`~lightning_trust.core.capture.ForwardCapture`).

Example:
    >>> DomainPass.__name__  # the mixin CrossDomainEvaluation's hooks delegate to
    'DomainPass'
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_trust.core.batch import BatchKeyError, batch_size_of
from lightning_trust.core.capture import step_predictions
from lightning_trust.evaluation.domains import DomainIndex, domain_names, in_domain_names, side_domains
from lightning_trust.evaluation.extra_passes import add_predictions
from lightning_trust.evaluation.results import DomainMetrics
from lightning_trust.evaluation.subset import SUBSET
from lightning_trust.evaluation.tokens import label_shift

__all__ = ["DomainPass"]


class DomainPass:
    """The domains and the scoring of the stage's own batches (a mixin of ``CrossDomainEvaluation``,
    whose attributes it reads and sets)."""

    # the attributes CrossDomainEvaluation sets
    domain_key: Any
    domain_values: Any
    domains: Any
    in_domain: Any
    num_classes: Any
    specs: Any
    buffer_size: int
    base_domain: str
    corruptions: list[str]
    severities: list[int]
    contract: Any
    prediction_type: str
    label_shift: Any
    _side_codes: Any
    _side_names: list[str]
    _index: Any
    _metrics: Any
    _names: list[str]
    _in_names: list[str]
    _active: bool
    _capture: Any
    _probed: Any
    _rows: int

    def _resolve_domains(self, trainer: pl.Trainer) -> None:
        """This run's domains, which are in-domain, and their metrics (kept, reset, across stages)."""
        if self.domain_key is not None:
            self._side_codes, self._side_names = side_domains(
                self.domain_key, self.domain_values, trainer, self.contract
            )
        self._index = DomainIndex(self._side_codes)
        extra = [str(n) for n in self.domains]
        names = domain_names(self._clean_names(), extra, self._corrupted_names())
        classes = self.num_classes
        datamodule = getattr(trainer, "datamodule", None)
        if classes is None and isinstance(getattr(datamodule, "num_classes", None), int):
            classes = int(datamodule.num_classes)  # type: ignore[union-attr]
        if self._metrics is None or names != self._names:  # kept (and reset) across stages otherwise
            hidden = [SUBSET] if self.corruptions else []  # the clean copy of a cut corruption suite's samples
            self._metrics = DomainMetrics(names + hidden, self.specs, self.buffer_size, classes)
        elif classes is not None:
            self._metrics.num_classes = self._metrics.num_classes or classes
        self._metrics.reset()
        self._names = names
        self._in_names = in_domain_names(
            self.in_domain, names, self._side_codes, self._side_names, extra, self.domain_key, self.base_domain,
            other_sources=bool(self.corruptions),
        )  # fmt: skip

    def _clean_names(self) -> list[str]:
        """The domains of the validation/test data itself: the side-column values, or ``base_domain``."""
        return list(self._side_names) if self.domain_key else [self.base_domain]

    def _corrupted_names(self) -> list[str]:
        return [f"{c}_s{s}" for c in self.corruptions for s in self.severities]

    def _arm(self, pl_module: pl.LightningModule, batch: Any, dataloader_idx: int) -> None:
        """Keep the output of the step's own forward call, so the clean domain costs no extra pass."""
        if not self._active or dataloader_idx != 0:
            self._capture.disarm()
            return
        size = batch_size_of(batch, self.contract, missing_ok=True)
        self._capture.arm(pl_module, size)

    def _check_domain_column(self, batch: Any) -> None:
        """Fail early (also during the sanity check) with the keys the batch has."""
        if self.domain_key is not None and not self.contract.has_side(batch, self.domain_key):
            try:
                self.contract.side(batch, self.domain_key)
            except BatchKeyError as err:
                raise BatchKeyError(f"CrossDomainEvaluation(domain_key={self.domain_key!r}): {err}") from None

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int, dataloader_idx: int) -> None:  # fmt: skip
        if dataloader_idx != 0:
            self._capture.disarm()
            return
        self._check_domain_column(batch)
        if not self._active:
            self._capture.disarm()
            return
        assert self._metrics is not None
        preds = step_predictions(self._capture, self.contract, pl_module, batch, outputs, trainer)
        target = torch.as_tensor(self.contract.target(batch), device=preds.device)
        self._rows += len(target)
        if self._probed.shift is None:  # no sample at setup: decided on the first batch
            self._probed.shift = label_shift(self.label_shift, self.contract.inputs(batch), target)
        if self.domain_key is not None:
            index = self._index(self.contract.side(batch, self.domain_key), preds.device)
        else:
            index = torch.zeros(len(target), dtype=torch.long, device=preds.device)
        add_predictions(self._metrics, preds, target, index, self._probed.shift, self.prediction_type)
