"""``CrossDomainEvaluation``: per-domain metrics, worst domain, in-domain vs OOD gap, calibration and
corruption robustness for any Lightning run."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import Metric

from lightning_trust.core.batch import BatchContract, BatchKeyError, predictions_from_outputs
from lightning_trust.evaluation.corruptions import SEVERITIES, corrupt, corruption_errors, resolve_corruptions
from lightning_trust.evaluation.metrics import MetricSpec, higher_is_better, to_probabilities
from lightning_trust.evaluation.summary import bar_chart, reliability_diagram, summarize, write_tables
from lightning_trust.core import artifact_dir, isolated_eval, save_figure, write_json

log = logging.getLogger(__name__)

__all__ = ["CrossDomainEvaluation"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


def _safe(name: str) -> str:
    """A domain name usable in a metric key and a file name."""
    return _UNSAFE.sub("_", str(name)).strip("_") or "domain"


class CrossDomainEvaluation(Callback):
    """Evaluate the model per domain, WILDS/ImageNet-C style, during validation and test.

    Domains come from a side column of the batch contract (``domain_key``, e.g. Adult's
    ``native_region``), from extra named datasets/dataloaders (``domains``), and from a suite of
    image ``corruptions`` applied to the validation/test inputs at several severities. Every
    metric is a torchmetrics object per domain (states reduced across processes under DDP);
    predictions are buffered on the device and each domain's metrics are updated once per
    ``buffer_size`` samples, so no step waits on the host.

    Logged: ``domain/<name>/<metric>`` and ``domain/summary/<summary>/<metric>`` (``average``,
    ``weighted_average``, ``worst``, ``in_domain``, ``ood``, ``ood_gap``), plus
    ``domain/summary/corruption_error`` and ``relative_corruption_error`` with corruptions. Files in
    ``<log_dir>/lightning_trust/evaluation``: ``domains_<stage>.csv``/``.md``, a bar chart per
    metric (``domain_<metric>.png``) and a reliability diagram per domain with ``"ece"``.

    Args:
        domain_key: side column naming each sample's domain (read with the batch contract).
        in_domain: which domains are in-distribution: names (``"United-States"``) or column codes
            (``0``), or names of extra domains. Default: the side-column domains when other sources
            exist; with no ``domain_key``, the validation data (``base_domain``).
        domain_values: the column values to evaluate, in order (default: every value of
            ``datamodule.categories[domain_key]``, else the values found in the validation set).
        domains: extra domains ``{name: source}``; a source is a ``Dataset``, a ``DataLoader``, a
            callable returning one, or (YAML) the name of a DataModule/LightningModule attribute or
            method such as ``"test_dataloader"``. Evaluated with the module's own forward.
        corruptions: ``"all"`` or a list of image corruptions (``gaussian_noise``, ``shot_noise``,
            ``impulse_noise``, ``speckle_noise``, ``blur``, ``contrast``, ``brightness``,
            ``pixelate``, ``occlusion``) applied to the validation/test inputs as extra domains
            ``<corruption>_s<severity>``.
        severities: corruption severities (1-5).
        baseline_errors: JSON file of a baseline model's errors (the ``corruption_errors_<stage>.json``
            this callback writes) to normalize the corruption error (ImageNet-C's mCE).
        metrics: short names (``accuracy``, ``f1``, ``auroc``, ``nll``, ``ece``, ``brier``) or
            torchmetrics class paths.
        metric_args: extra init arguments per metric name, e.g. ``{"ece": {"n_bins": 10}}``.
        every_n_epochs: evaluate on every n-th validation epoch (and always at the last one and at test).
        base_domain: name of the validation/test data as a domain when there is no ``domain_key``.
        prediction_type: whether predictions are ``"logits"`` (softmax/sigmoid applied) or ``"probs"``.
        num_classes: number of classes (default: ``datamodule.num_classes``, else the predictions' width).
        value_range: range of image values the corruptions assume (inputs are clipped to it).
        batch_size: batch size for extra domain datasets (default: the DataModule's, else 256).
        buffer_size: predictions kept on the device before the per-domain metric update.
        figures: write the bar charts and reliability diagrams (at the end of fit and of test).
        seed: seed of the corruption noise (each batch and corruption gets its own generator).
        batch_keys: batch contract overrides (``{"input": ..., "target": ..., domain_key: ...}``).

    Example:
        >>> trainer = pl.Trainer(callbacks=[CrossDomainEvaluation(
        ...     domain_key="native_region", in_domain=["United-States"], metrics=["accuracy", "ece"])])
        >>> trainer.fit(TabularMLP(), AdultDataModule())
        >>> trainer.callbacks[0].report()["ood_gap"]["accuracy"]
    """

    report_section = "evaluation"

    def __init__(
        self,
        domain_key: Optional[str] = None,
        in_domain: Optional[list[Union[str, int]]] = None,
        domain_values: Optional[list[Union[str, int]]] = None,
        domains: Optional[dict[str, Any]] = None,
        corruptions: Union[None, str, list[str]] = None,
        severities: list[int] = list(SEVERITIES),  # noqa: B006 - jsonargparse shows the default
        baseline_errors: Optional[str] = None,
        metrics: list[str] = ["accuracy", "nll", "ece"],  # noqa: B006
        metric_args: Optional[dict[str, dict[str, Any]]] = None,
        every_n_epochs: int = 1,
        base_domain: str = "clean",
        prediction_type: Literal["logits", "probs"] = "logits",
        num_classes: Optional[int] = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        batch_size: Optional[int] = None,
        buffer_size: int = 8192,
        figures: bool = True,
        seed: int = 0,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
    ) -> None:
        super().__init__()
        if domain_key is not None and (not isinstance(domain_key, str) or not domain_key):
            raise ValueError(f"`domain_key` must be a side-column name, got {domain_key!r}.")
        self.corruptions = resolve_corruptions(corruptions)
        if domains is not None and not isinstance(domains, Mapping):
            raise ValueError(f"`domains` must map a domain name to a dataset, dataloader or method name, got {domains!r}.")
        self.domains = dict(domains or {})
        if domain_key is None and not self.domains and not self.corruptions:
            raise ValueError(
                "CrossDomainEvaluation has no domains: set `domain_key` (a side column such as 'native_region'), "
                "`domains` (extra datasets) or `corruptions`."
            )
        if domain_key is None and domain_values is not None:
            raise ValueError("`domain_values` needs a `domain_key` to read them from.")
        if not isinstance(severities, (list, tuple)) or not severities or any(
            not isinstance(s, int) or not 1 <= s <= 5 for s in severities
        ):
            raise ValueError(f"`severities` must be a non-empty list of ints in 1..5, got {severities!r}.")
        if len(set(severities)) != len(severities):
            raise ValueError(f"`severities` lists a severity twice: {severities}.")
        if baseline_errors is not None and not self.corruptions:
            raise ValueError("`baseline_errors` normalizes the corruption error; set `corruptions` too.")
        if not isinstance(metrics, (list, tuple)) or not metrics:
            raise ValueError(f"`metrics` must be a non-empty list of metric names, got {metrics!r}.")
        metric_args = dict(metric_args or {})
        unknown_args = [k for k in metric_args if k not in metrics]
        if unknown_args:
            raise ValueError(f"`metric_args` names metrics not in `metrics` {list(metrics)}: {unknown_args}.")
        metric_list = list(metrics)
        if self.corruptions and "accuracy" not in metric_list:
            metric_list.append("accuracy")  # the corruption error is 1 - accuracy
        self.specs = [MetricSpec.from_name(m, metric_args.get(m)) for m in metric_list]
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"`metrics` has two metrics with one name: {names}.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}.")
        if prediction_type not in ("logits", "probs"):
            raise ValueError(f"`prediction_type` must be 'logits' or 'probs', got {prediction_type!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"`value_range` must be (low, high) with low < high, got {value_range!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"`buffer_size` must be a positive integer, got {buffer_size!r}.")
        self.domain_key = domain_key
        self.in_domain = list(in_domain) if in_domain is not None else None
        self.domain_values = list(domain_values) if domain_values is not None else None
        self.severities = list(severities)
        self.baseline_errors = baseline_errors
        self.metric_names = names
        self.every_n_epochs = every_n_epochs
        self.base_domain = base_domain
        self.prediction_type = prediction_type
        self.num_classes = num_classes
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.figures = figures
        self.seed = seed
        self.batch_keys = batch_keys

        self.contract = BatchContract()
        self.results: dict[str, dict[str, Any]] = {}  # stage -> latest evaluation
        self.history: list[dict[str, Any]] = []  # one summary per validation evaluation
        self._figures: dict[str, str] = {}
        self._baseline: Optional[dict[str, Any]] = None
        # set up per run
        self._names: list[str] = []
        self._side_names: list[str] = []
        self._side_codes: list[Union[int, float, str]] = []
        self._in_names: list[str] = []
        self._metrics: Optional[list[dict[str, Metric]]] = None
        self._buffer: list[tuple[Tensor, Tensor, Tensor]] = []
        self._buffered = 0
        self._counts: list[int] = []
        self._unlisted = 0
        self._classes: Optional[int] = None
        self._active = False
        self._stage = "validate"
        self._hook: Any = None
        self._captured: Optional[tuple[Any, Tensor]] = None
        self._loaders: dict[str, DataLoader] = {}
        self._lookup: Optional[tuple[Tensor, Tensor]] = None

    # setup ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.contract = BatchContract.resolve(self.batch_keys, trainer)
        datamodule = getattr(trainer, "datamodule", None)
        if self.num_classes is not None:
            self._classes = self.num_classes
        elif isinstance(getattr(datamodule, "num_classes", None), int):
            self._classes = int(datamodule.num_classes)  # type: ignore[union-attr]
        self._side_codes, self._side_names = self._resolve_side_domains(trainer)
        extra = [str(n) for n in self.domains]
        corrupted = [f"{c}_s{s}" for c in self.corruptions for s in self.severities]
        names = (self._side_names if self.domain_key else [self.base_domain]) + extra + corrupted
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Domain names must be unique; {duplicates} appear twice. Rename the extra `domains`.")
        if names != self._names:
            self._metrics = None  # built on the first predictions; kept (and reset) across stages otherwise
        self._names = names
        self._in_names = self._resolve_in_domain(extra)
        if self.baseline_errors is not None and self._baseline is None:
            self._baseline = _load_baseline(self.baseline_errors)
        self._loaders = {}
        self._reset_buffers()

    def _resolve_side_domains(self, trainer: pl.Trainer) -> tuple[list[Any], list[str]]:
        if self.domain_key is None:
            return [], []
        categories = getattr(getattr(trainer, "datamodule", None), "categories", None)
        names_of = list(categories[self.domain_key]) if isinstance(categories, Mapping) and self.domain_key in categories else None
        values = self.domain_values
        if values is None:
            if names_of is not None:
                values = list(range(len(names_of)))
            else:
                values = self._discover_values(trainer)
        codes: list[Any] = []
        names: list[str] = []
        for value in values:
            if isinstance(value, str) and names_of is not None and value in names_of:
                codes.append(names_of.index(value))  # a name given for a coded column
                names.append(value)
            elif isinstance(value, int) and names_of is not None:
                if not 0 <= value < len(names_of):
                    raise ValueError(
                        f"`domain_values` has code {value}, but {self.domain_key!r} has codes 0..{len(names_of) - 1} "
                        f"({names_of})."
                    )
                codes.append(value)
                names.append(str(names_of[value]))
            else:
                codes.append(value)
                names.append(str(value))
        if not codes:
            raise ValueError(f"No values of the domain column {self.domain_key!r} to evaluate; set `domain_values`.")
        return codes, names

    def _discover_values(self, trainer: pl.Trainer) -> list[Any]:
        from lightning_trust.evaluation.data import read_column

        source = getattr(trainer, "datamodule", None)
        dataset = getattr(source, "val_dataset", None)
        if dataset is None:
            try:
                loader = (source or trainer.lightning_module).val_dataloader()
                dataset = getattr(loader, "dataset", None)
            except Exception:  # noqa: BLE001 - any failure means: cannot discover, ask for the values
                dataset = None
        if dataset is None:
            raise ValueError(
                f"Cannot find the values of the domain column {self.domain_key!r}: the DataModule has no "
                f"`categories[{self.domain_key!r}]` and no `val_dataset`. Set `domain_values: [...]`."
            )
        column = read_column(dataset, self.contract, self.domain_key)  # type: ignore[arg-type]
        return sorted(set(column.tolist()))

    def _resolve_in_domain(self, extra: list[str]) -> list[str]:
        if self.in_domain is None:
            if self.domain_key is None:
                return [self.base_domain]
            return list(self._side_names) if (extra or self.corruptions) else []
        resolved = []
        for value in self.in_domain:
            if isinstance(value, str) and value in self._names:
                resolved.append(value)
            elif value in self._side_codes:
                resolved.append(self._side_names[self._side_codes.index(value)])
            elif str(value) in self._names:
                resolved.append(str(value))
            else:
                codes = ", ".join(f"{n!r} (code {c!r})" for c, n in zip(self._side_codes, self._side_names))
                raise ValueError(
                    f"`in_domain` value {value!r} is not a domain. Domains: {codes or ''}"
                    f"{', ' if codes and extra else ''}{', '.join(map(repr, extra))}{' ' if codes or extra else ''}"
                    f"{'(and ' + repr(self.base_domain) + ')' if not self.domain_key else ''}."
                )
        return resolved

    # hooks ------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("validate", trainer)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test", trainer)

    def _start(self, stage: str, trainer: pl.Trainer) -> None:
        self._stage = stage
        if stage == "test" or trainer.state.fn == "validate":
            self._active = True
        else:
            epoch = trainer.current_epoch + 1
            last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
            self._active = not trainer.sanity_checking and (epoch % self.every_n_epochs == 0 or last)
        self._reset_buffers()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._capture(pl_module, dataloader_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._capture(pl_module, dataloader_idx)

    def _capture(self, pl_module: pl.LightningModule, dataloader_idx: int) -> None:
        """Keep the output of the step's own forward call, so the clean domain costs no extra pass."""
        self._captured = None
        if not self._active or dataloader_idx != 0:
            return

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            if self._captured is None and args and isinstance(output, Tensor):
                self._captured = (args[0], output.detach())

        self._hook = pl_module.register_forward_hook(hook)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int, dataloader_idx: int) -> None:  # fmt: skip
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if dataloader_idx != 0:
            return
        if self.domain_key is not None and not self.contract.has_side(batch, self.domain_key):
            try:  # fail early (also during the sanity check) with the keys the batch has
                self.contract.side(batch, self.domain_key)
            except BatchKeyError as err:
                raise BatchKeyError(f"CrossDomainEvaluation(domain_key={self.domain_key!r}): {err}") from None
        if not self._active:
            return
        inputs = self.contract.inputs(batch)
        target = self.contract.target(batch)
        preds = predictions_from_outputs(outputs, batch_size=_rows(inputs))
        if preds is None and self._captured is not None and self._captured[0] is inputs:
            preds = self._captured[1]
        self._captured = None
        if preds is None:
            with isolated_eval(pl_module, trainer):
                preds = self.contract.predictions(pl_module, batch)
        probs = to_probabilities(preds, self.prediction_type)
        target = torch.as_tensor(target, device=probs.device).reshape(-1)
        if self.domain_key is not None:
            index = self._domain_index(self.contract.side(batch, self.domain_key), probs.device)
        else:
            index = torch.zeros(len(target), dtype=torch.long, device=probs.device)
        self._add(probs, target, index)
        if self.corruptions:
            self._corrupted(trainer, pl_module, inputs, target, batch_idx)

    def _domain_index(self, column: Any, device: torch.device) -> Tensor:
        """Each sample's domain index (``len(side domains)`` for values not evaluated), on the device."""
        k = len(self._side_codes)
        if isinstance(column, (list, tuple)) and column and isinstance(column[0], str):
            lookup = {c: i for i, c in enumerate(self._side_codes)}
            return torch.tensor([lookup.get(v, k) for v in column], dtype=torch.long, device=device)
        column = torch.as_tensor(column, device=device).reshape(-1)
        if self._lookup is None or self._lookup[0].device != device:
            codes = torch.tensor(self._side_codes, device=device)
            sorted_codes, order = codes.sort()
            self._lookup = (sorted_codes, order)
        sorted_codes, order = self._lookup
        sorted_codes = sorted_codes.to(column.dtype)
        pos = torch.searchsorted(sorted_codes, column).clamp(max=k - 1)  # no host sync
        return torch.where(sorted_codes[pos] == column, order[pos], torch.full_like(pos, k))

    def _corrupted(self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Any, target: Tensor,
                   batch_idx: int) -> None:  # fmt: skip
        first = self._names.index(f"{self.corruptions[0]}_s{self.severities[0]}")
        with isolated_eval(pl_module, trainer):
            for ci, name in enumerate(self.corruptions):
                for si, severity in enumerate(self.severities):
                    generator = torch.Generator(device=inputs.device if isinstance(inputs, Tensor) else "cpu")
                    generator.manual_seed(
                        (self.seed * 1_000_003 + trainer.global_rank * 100_003 + batch_idx * 1009 + ci * 17 + severity)
                        % (2**63)
                    )
                    x = corrupt(inputs, name, severity, generator, self.value_range)
                    probs = to_probabilities(pl_module(x), self.prediction_type)
                    d = first + ci * len(self.severities) + si
                    self._add(probs, target, torch.full_like(target, d, dtype=torch.long))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, pl_module, "validate")
        self._active = False

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, pl_module, "test")
            if self.figures:
                self._write_figures(trainer, "test")
        self._active = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.figures and "validate" in self.results:
            self._write_figures(trainer, "validate")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # accumulation -----------------------------------------------------------------------------
    def _reset_buffers(self) -> None:
        self._buffer = []
        self._buffered = 0
        self._counts = [0] * len(self._names)
        self._unlisted = 0
        for metrics in self._metrics or []:
            for metric in metrics.values():
                metric.reset()

    def _add(self, probs: Tensor, target: Tensor, index: Tensor) -> None:
        self._buffer.append((probs, target, index))
        self._buffered += len(target)
        if self._buffered >= self.buffer_size:
            self._flush()

    def _build_metrics(self, num_classes: int, device: torch.device) -> None:
        self._classes = num_classes
        self._metrics = [{s.name: s.build(num_classes).to(device) for s in self.specs} for _ in self._names]

    def _flush(self) -> None:
        """One update per domain and metric with everything buffered (one host sync for the counts)."""
        if not self._buffer:
            return
        probs = torch.cat([b[0] for b in self._buffer])
        target = torch.cat([b[1] for b in self._buffer]).long()
        index = torch.cat([b[2] for b in self._buffer])
        self._buffer, self._buffered = [], 0
        if self._metrics is None:
            self._build_metrics(self._classes or int(probs.shape[1]), probs.device)
        if probs.shape[1] != self._classes:
            raise ValueError(
                f"Predictions have {probs.shape[1]} columns but the metrics were built for {self._classes} classes; "
                "set `num_classes` to match the model's outputs."
            )
        k = len(self._names)
        counts = torch.bincount(index, minlength=k + 1).tolist()
        order = torch.argsort(index, stable=True)
        probs_sorted, target_sorted = probs[order], target[order]
        start = 0
        for d, n in enumerate(counts[:k]):
            if n:
                p, t = probs_sorted[start : start + n], target_sorted[start : start + n]
                for metric in self._metrics[d].values():  # type: ignore[index]
                    metric.update(p[:, 1] if MetricSpec.takes_positive_probability(metric) else p, t)
                self._counts[d] += n
            start += n
        self._unlisted += counts[k] if len(counts) > k else 0

    # epoch end --------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluate_extra_domains(trainer, pl_module)
        self._flush()
        strategy = trainer.strategy
        device = pl_module.device
        if self._metrics is None:  # this process saw no data: agree on the class count with the others
            local = torch.tensor(self._classes or 0, device=device)
            classes = int(strategy.reduce(local, reduce_op="max")) if trainer.world_size > 1 else int(local)
            if classes < 2:
                raise RuntimeError("CrossDomainEvaluation saw no predictions in any domain; is the dataloader empty?")
            self._build_metrics(classes, device)
        elif trainer.world_size > 1:
            strategy.reduce(torch.tensor(self._classes or 0, device=device), reduce_op="max")  # matched collective
        totals = torch.tensor([*self._counts, self._unlisted], dtype=torch.long, device=device)
        if trainer.world_size > 1:
            totals = strategy.reduce(totals, reduce_op="sum")
        totals_list = [int(v) for v in totals.tolist()]
        sizes = dict(zip(self._names, totals_list[:-1]))
        unlisted = totals_list[-1]
        per_domain: dict[str, dict[str, Optional[float]]] = {}
        reliability: dict[str, dict[str, list[float]]] = {}
        directions: dict[str, bool] = {}
        for d, name in enumerate(self._names):
            per_domain[name] = {}
            for metric_name, metric in self._metrics[d].items():  # type: ignore[index]
                directions[metric_name] = higher_is_better(metric)
                if sizes[name] == 0:
                    per_domain[name][metric_name] = None
                    continue
                value = metric.compute()  # syncs the states across processes
                per_domain[name][metric_name] = float(value) if isinstance(value, Tensor) and value.numel() == 1 else None
                if type(metric).__name__ == "MulticlassCalibrationError":
                    reliability[name] = _reliability_bins(metric)
                metric.reset()
        empty = [n for n in self._names if sizes[n] == 0]
        if empty:
            rank_zero_warn(
                f"CrossDomainEvaluation: domain(s) {empty} had no samples in this {stage} pass; their metrics are "
                "left out of the summaries (reported as null, listed under `empty_domains`)."
            )
        if unlisted:
            rank_zero_warn(
                f"CrossDomainEvaluation: {unlisted} samples had a {self.domain_key!r} value outside the evaluated "
                f"domains {self._side_names}; add the value to `domain_values` to evaluate it."
            )
        summaries = summarize(per_domain, sizes, directions, self._in_names)
        result: dict[str, Any] = {
            "stage": stage,
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
            "metrics": list(self.metric_names),
            "domains": list(self._names),
            "in_domain_domains": [n for n in self._names if n in self._in_names],
            "ood_domains": [n for n in self._names if n not in self._in_names],
            "sizes": sizes,
            "empty_domains": empty,
            "unlisted_samples": unlisted,
            "per_domain": per_domain,
            **summaries,
            "reliability": reliability,
        }
        if self.corruptions:
            result.update(self._corruption_summary(per_domain, sizes))
        self.results[stage] = result
        if stage == "validate":
            self.history.append({k: result[k] for k in ("epoch", "step", "average", "worst", "worst_domain", "ood_gap")})
        self._log(pl_module, result)
        # `trainer.log_dir` is a collective under DDP: every process asks, only rank zero writes
        folder = artifact_dir(trainer, "evaluation")
        result["tables"] = {"csv": str(folder / f"domains_{stage}.csv"), "markdown": str(folder / f"domains_{stage}.md")}
        if "corruption" in result:
            result["tables"]["corruption_errors"] = str(folder / f"corruption_errors_{stage}.json")
        self._write_tables(folder, stage, result)

    def _corruption_summary(self, per_domain: dict[str, dict[str, Optional[float]]], sizes: dict[str, int]) -> dict[str, Any]:
        clean = [n for n in self._names if n in (self._side_names if self.domain_key else [self.base_domain])]
        accs = [(per_domain[n]["accuracy"], sizes[n]) for n in clean if per_domain[n].get("accuracy") is not None]
        total = sum(w for _, w in accs)
        clean_error = 1.0 - sum(a * w for a, w in accs) / total if total else float("nan")  # type: ignore[operator]
        errors: dict[str, dict[int, float]] = {}
        for c in self.corruptions:
            errors[c] = {}
            for s in self.severities:
                acc = per_domain[f"{c}_s{s}"].get("accuracy")
                if acc is not None:
                    errors[c][s] = 1.0 - acc
        errors = {c: v for c, v in errors.items() if v}
        ce = corruption_errors(clean_error, errors, self._baseline)
        return {
            "corruption_error": ce["corruption_error"],
            "relative_corruption_error": ce["relative_corruption_error"],
            "corruption": ce,
        }

    def _evaluate_extra_domains(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in self.domains:
            loader = self._loader(name, trainer, pl_module)
            d = self._names.index(str(name))
            with isolated_eval(pl_module, trainer):
                for batch in loader:
                    batch = trainer.strategy.batch_to_device(batch)
                    probs = to_probabilities(self.contract.predictions(pl_module, batch), self.prediction_type)
                    target = torch.as_tensor(self.contract.target(batch), device=probs.device).reshape(-1).long()
                    self._add(probs, target, torch.full_like(target, d))

    def _loader(self, name: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> DataLoader:
        if name in self._loaders:
            return self._loaders[name]
        source = self.domains[name]
        if isinstance(source, str):
            owners = [o for o in (getattr(trainer, "datamodule", None), pl_module) if o is not None]
            owner = next((o for o in owners if hasattr(o, source)), None)
            if owner is None:
                raise ValueError(
                    f"Extra domain {name!r}: neither the DataModule nor the LightningModule has an attribute or "
                    f"method {source!r} (e.g. 'test_dataloader' or 'test_dataset')."
                )
            source = getattr(owner, source)
        if callable(source) and not isinstance(source, (Dataset, DataLoader)):
            source = source()
        if isinstance(source, DataLoader):
            dataset, batch_size, collate = source.dataset, source.batch_size or 1, source.collate_fn
        elif isinstance(source, Dataset):
            dm_batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
            dataset, collate = source, None
            batch_size = self.batch_size or (dm_batch if isinstance(dm_batch, int) else 256)
        else:
            raise ValueError(f"Extra domain {name!r} must give a Dataset or a DataLoader, got {type(source).__name__}.")
        if not hasattr(dataset, "__len__"):
            raise ValueError(f"Extra domain {name!r} needs a map-style dataset (with __len__), got {type(dataset).__name__}.")
        if trainer.world_size > 1:  # each process evaluates its own share, without padding duplicates
            dataset = Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {"collate_fn": collate} if collate is not None else {}
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)
        self._loaders[name] = loader
        return loader

    # output -----------------------------------------------------------------------------------
    def _log(self, pl_module: pl.LightningModule, result: dict[str, Any]) -> None:
        values: dict[str, float] = {}
        for name, metrics in result["per_domain"].items():
            for metric, value in metrics.items():
                if value is not None:
                    values[f"domain/{_safe(name)}/{metric}"] = value
        for key in ("average", "weighted_average", "worst", "in_domain", "ood", "ood_gap"):
            for metric, value in result.get(key, {}).items():
                if value is not None:
                    values[f"domain/summary/{key}/{metric}"] = value
        for key in ("corruption_error", "relative_corruption_error"):
            if key in result and not math.isnan(result[key]):
                values[f"domain/summary/{key}"] = result[key]
        if not values:
            return
        # Every process holds the same synced numbers, so they go straight to the loggers (rank zero)
        # and to `callback_metrics` (for ModelCheckpoint/EarlyStopping monitors): `self.log` would
        # build a reducing result object per key, costing more than the whole evaluation.
        trainer = pl_module.trainer
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        self._log_to_loggers(trainer, values)

    @staticmethod
    @rank_zero_only
    def _log_to_loggers(trainer: pl.Trainer, values: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    @rank_zero_only
    def _write_tables(self, folder: Path, stage: str, result: dict[str, Any]) -> None:
        write_tables(folder / f"domains_{stage}", result["per_domain"], result["sizes"], self.metric_names,
                     self._in_names, result)  # fmt: skip
        if "corruption" in result:
            write_json(folder / f"corruption_errors_{stage}.json", result["corruption"])

    def _write_figures(self, trainer: pl.Trainer, stage: str) -> None:
        folder = artifact_dir(trainer, "evaluation")  # on every process (a collective under DDP)
        suffix = "" if stage == "validate" else "_test"
        result = self.results[stage]
        for metric in self.metric_names:
            self._figures[f"domain_{metric}{suffix}"] = str(folder / f"domain_{metric}{suffix}.png")
        for name in result.get("reliability", {}):
            self._figures[f"reliability_{_safe(name)}{suffix}"] = str(folder / f"reliability_{_safe(name)}{suffix}.png")
        self._draw_figures(trainer, folder, stage, suffix)

    @rank_zero_only
    def _draw_figures(self, trainer: pl.Trainer, folder: Path, stage: str, suffix: str) -> None:
        result = self.results[stage]
        for metric in self.metric_names:
            reference = result.get("in_domain", {}).get(metric)
            fig = bar_chart(metric, result["per_domain"], self._in_names, reference)
            path = folder / f"domain_{metric}{suffix}.png"
            save_figure(trainer, fig, path, tag=f"evaluation/domain_{metric}{suffix}")
        for name, bins in result.get("reliability", {}).items():
            ece = next((v for m, v in result["per_domain"][name].items() if m == "ece"), None)
            fig = reliability_diagram(name, bins["accuracy"], bins["confidence"], bins["proportion"], ece)
            path = folder / f"reliability_{_safe(name)}{suffix}.png"
            save_figure(trainer, fig, path, tag=f"evaluation/reliability_{_safe(name)}{suffix}")

    # report and checkpoint --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The latest evaluation (test when run, else the last validation) as plain JSON."""
        stage = "test" if "test" in self.results else "validate"
        if stage not in self.results:
            return {"evaluated": False, "metrics": list(self.metric_names), "figures": dict(self._figures)}
        result = self.results[stage]
        keys = ("stage", "epoch", "metrics", "domains", "in_domain_domains", "ood_domains", "sizes", "empty_domains",
                "unlisted_samples", "per_domain", "average", "weighted_average", "worst", "worst_domain", "best",
                "best_domain", "in_domain", "in_domain_weighted", "ood", "ood_weighted", "ood_gap",
                "corruption_error", "relative_corruption_error", "corruption", "tables")  # fmt: skip
        out: dict[str, Any] = {"evaluated": True, "domain_key": self.domain_key}
        out.update({k: result[k] for k in keys if k in result})
        if stage == "test" and "validate" in self.results:
            val = self.results["validate"]
            out["validation"] = {k: val[k] for k in ("epoch", "per_domain", "average", "worst", "ood_gap") if k in val}
        out["history"] = list(self.history)
        out["figures"] = dict(self._figures)
        return _clean(out)

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "history": self.history, "figures": self._figures}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
        self.history = list(state_dict.get("history", []))
        self._figures = dict(state_dict.get("figures", {}))


def _clean(value: Any) -> Any:
    """Plain JSON: NaN becomes ``None``, tuples lists, keys strings."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _rows(inputs: Any) -> Optional[int]:
    if isinstance(inputs, Tensor) and inputs.ndim > 0:
        return int(inputs.shape[0])
    return None


def _reliability_bins(metric: Metric) -> dict[str, list[float]]:
    """Accuracy, confidence and share per confidence bin of a calibration-error metric (synced states)."""
    from torchmetrics.utilities.data import dim_zero_cat

    n_bins = int(getattr(metric, "n_bins", 15))
    with metric.sync_context(should_sync=True, should_unsync=True):
        confidences = dim_zero_cat(metric.confidences).float()  # type: ignore[arg-type]
        accuracies = dim_zero_cat(metric.accuracies).float()  # type: ignore[arg-type]
    index = (confidences * n_bins).long().clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, device=confidences.device).scatter_add_(0, index, torch.ones_like(confidences))
    conf = torch.zeros(n_bins, device=confidences.device).scatter_add_(0, index, confidences)
    acc = torch.zeros(n_bins, device=confidences.device).scatter_add_(0, index, accuracies)
    safe = count.clamp_min(1)
    return {
        "accuracy": (acc / safe).tolist(),
        "confidence": (conf / safe).tolist(),
        "proportion": (count / count.sum().clamp_min(1)).tolist(),
        "count": count.long().tolist(),
    }


def _load_baseline(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(
            f"`baseline_errors` file {path!r} does not exist; point it at a baseline run's "
            "lightning_trust/evaluation/corruption_errors_<stage>.json."
        )
    data = json.loads(file.read_text())
    if isinstance(data, Mapping) and "corruption" in data and "errors" not in data:
        data = data["corruption"]  # a saved report section
    if not isinstance(data, Mapping) or "errors" not in data or "clean_error" not in data:
        raise ValueError(
            f"`baseline_errors` {path!r} must hold {{'clean_error': float, 'errors': {{corruption: {{severity: error}}}}}} "
            "(the corruption_errors_<stage>.json this callback writes)."
        )
    return dict(data)
