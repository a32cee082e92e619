"""``TrustReport``: the run writes its own model card and judges it against declared standards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_trust.core.batch import BatchContract, BatchKeyError
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability
from lightning_trust.core.protocol import collect_reports, section_names
from lightning_trust.core.tensors import first_tensor, map_tensors
from lightning_trust.report import facts
from lightning_trust.report.card import CARD_STEM, assemble_card, embed_figures, split_figures, write_card
from lightning_trust.report.hf_card import check_license
from lightning_trust.report.rows import standards_summary
from lightning_trust.report.standards import (
    FACT_SECTIONS,
    UnknownStandardError,
    addressable,
    close_matches,
    flatten_numbers,
    metric_stage,
    parse_standards,
    unknown_message,
)

__all__ = ["TrustReport"]


class TrustReport(TrustCallback):
    """Collects every pack callback's ``report()`` and the run's facts into a model card, judged
    against declared ``standards``.

    At the end of ``fit`` (and again after ``validate``/``test``) it writes, on rank zero, into the
    run's log dir (or ``output_dir``): ``model_card.json`` (schema
    :func:`~lightning_trust.report.card_schema`, versioned), ``model_card.md`` and a
    self-contained ``model_card.html`` (figures embedded, no network), then prints the card's path
    and the met / not-met summary.

    The report knows no callback's internals: it reads every callback with a ``report_section`` and
    a ``report()`` (:mod:`lightning_trust.core.protocol`), each under its stable section name (the
    callback's ``name``, else its ``report_section``; two callbacks with one name are refused).
    The run's facts: model (params, size, MACs), data (split sizes, class balance, group sizes of sensitive features and domains), training
    (epochs, steps, time, hardware, seed, package versions, configuration) and final metrics.

    Args:
        standards: dotted name -> ``{min: x}`` and/or ``{max: y}`` (inclusive), on any number the run
            reports: ``privacy.epsilon``, ``fairness.demographic_parity_difference``,
            ``evaluation.ood_gap.accuracy``, ``compression.speedup``, ``model.params``,
            ``metrics.val/acc``... A name the run does not report is an error listing the names it does
            and the close ones. A ``metrics.`` name is checked as soon as it could have been logged: one
            close to a logged name (``val/accc`` beside ``val/acc``) at the end of the sanity check,
            before training; a validation metric not logged at the end of the first validation; a
            training metric after the first epoch; the rest when the card is written. A number
            reported as NaN or null (an undefined fairness difference) never meets a standard.
        fail_on_breach: when a standard is not met (or not measured), set :attr:`exit_code` to 1 so
            ``lightning-trust`` exits non-zero (CI can gate a model on it). The card is written either way.
        title: the card's title; default ``"<Model> on <DataModule>"``.
        output_dir: folder for the card; default the run's log dir (``trainer.log_dir``).
        sensitive_features: side columns shown as sensitive groups (default: every side column of
            dict batches, shown as plain groups).
        domain_key: side column holding the domain (shown as domains).
        batch_keys: how to read batches (see :class:`~lightning_trust.core.batch.BatchContract`).
        max_data_samples: samples read per split for class balance when a dataset holds no tensors.
        license: the model's license, a Hugging Face Hub license id (``apache-2.0``...), kept in the card
            for ``lightning-trust report --format hf``.
        datasets: Hub ids of the data sets the model was trained and evaluated on (the card's ``data.datasets``).
        verbose: print the card's path and the standards summary.

    Example:
        >>> report = TrustReport(standards={"privacy.epsilon": {"max": 8}, "metrics.val/acc": {"min": 0.8}},
        ...                      fail_on_breach=True)
        >>> report.standards[0].name, report.fail_on_breach
        ('privacy.epsilon', True)
        >>> trainer = pl.Trainer(callbacks=[DifferentialPrivacy(target_epsilon=3), report])  # doctest: +SKIP

    YAML::

        - class_path: TrustReport
          init_args:
            standards:
              privacy.epsilon: {max: 8}
              fairness.demographic_parity_difference: {max: 0.1}
            fail_on_breach: true
    """

    #: Counting the model's MACs runs one isolated forward pass when the card is written.
    capabilities = frozenset({Capability.EXTRA_PASSES})

    def __init__(
        self,
        standards: Optional[dict[str, dict[str, float]]] = None,
        fail_on_breach: bool = False,
        title: Optional[str] = None,
        output_dir: Optional[str] = None,
        sensitive_features: Optional[list[str]] = None,
        domain_key: Optional[str] = None,
        batch_keys: Optional[dict[str, Union[str, int]]] = None,
        max_data_samples: int = 200_000,
        license: Optional[str] = None,
        datasets: Optional[list[str]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.standards = parse_standards(standards)
        if not isinstance(fail_on_breach, bool):
            raise TypeError(f"`fail_on_breach` must be true or false, got {fail_on_breach!r}.")
        if sensitive_features is not None and (
            isinstance(sensitive_features, str) or not all(isinstance(s, str) for s in sensitive_features)
        ):
            raise TypeError(f"`sensitive_features` must be a list of side-column names, got {sensitive_features!r}.")
        if domain_key is not None and not isinstance(domain_key, str):
            raise TypeError(f"`domain_key` must be a side-column name, got {domain_key!r}.")
        if max_data_samples < 1:
            raise ValueError(f"`max_data_samples` must be a positive integer, got {max_data_samples}.")
        check_license(license)
        if datasets is not None and (isinstance(datasets, str) or not all(isinstance(d, str) and d for d in datasets)):
            raise TypeError(
                f"`datasets` must be a list of Hub data set ids, e.g. ['scikit-learn/adult-census-income'], got {datasets!r}."
            )
        self.license = license
        self.datasets = list(datasets) if datasets is not None else None
        self.fail_on_breach = fail_on_breach
        self.title = title
        self.output_dir = output_dir
        self.sensitive_features = list(sensitive_features) if sensitive_features is not None else None
        self.domain_key = domain_key
        self.batch_keys = batch_keys
        self.max_data_samples = max_data_samples
        self.verbose = verbose
        #: 1 when ``fail_on_breach`` and a standard is not met; read by the ``lightning-trust`` CLI.
        self.exit_code = 0
        #: The last card written (the dict of ``model_card.json``) and its files.
        self.card: Optional[dict[str, Any]] = None
        self.paths: dict[str, Path] = {}
        self._contract: Optional[BatchContract] = None
        self._example: Any = None
        self._duration_s = 0.0
        self._fit_started: Optional[float] = None
        self._ran: set[str] = set()  # stages that ran under this report: their metric names are known
        self._metrics: dict[str, float] = {}  # the last value of every metric logged under this report
        self._checked: set[str] = set()  # stages whose metric standards were checked against the logged names

    # ------------------------------------------------------------------------------ hooks
    @staticmethod
    def _should_skip(stage: str) -> bool:
        """The one skip predicate: ``predict`` runs write no card and check nothing."""
        return stage == TrainerFn.PREDICTING

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._should_skip(stage):
            return
        self._contract = BatchContract.resolve(self.batch_keys, trainer)
        self._check_sections(trainer)

    def _check_sections(self, trainer: pl.Trainer) -> None:
        """Fail before any work on a standard whose section nothing in this Trainer reports."""
        sections = set(FACT_SECTIONS) | set(section_names(trainer))
        missing = sorted({s.name for s in self.standards if s.section not in sections})
        if missing:
            raise UnknownStandardError(
                f"TrustReport: standards {missing} name sections no callback in this Trainer reports. "
                f"Sections available: {sorted(sections)}. Add the callback that reports them, or fix the name "
                "(a callback given `name: x` reports under `x`)."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_clock()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_logged(trainer, "validation", complete=not trainer.sanity_checking)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train" in self._ran:  # a whole epoch has logged its training metrics
            self._check_logged(trainer, "train", complete=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ran.add("train")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ran.add("test")

    def _check_logged(self, trainer: pl.Trainer, stage: str, complete: bool) -> None:
        """Fail on ``metrics.`` standards the logged names rule out once ``stage`` has logged: a name
        close to a logged one, and (``complete``: a whole validation or training epoch logged) a name
        of ``stage`` that was not logged."""
        if stage in self._checked:
            return
        logged = sorted(str(k) for k in trainer.callback_metrics)
        unknown = []
        for standard in self.standards:
            name = standard.name.split(".", 1)[1] if standard.section == "metrics" else None
            if name is None or name in logged or metric_stage(name) not in (stage, None):
                continue
            if close_matches(name, logged) or (complete and metric_stage(name) == stage):
                unknown.append(standard.name)
        if unknown:
            raise UnknownStandardError(
                f"TrustReport (after {'the sanity check' if trainer.sanity_checking else stage}, before the card): "
                + unknown_message(unknown, [f"metrics.{n}" for n in logged])
            )
        if complete:
            self._checked.add(stage)
            self._ran.add(stage)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._remember_example(batch)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._remember_example(batch)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._remember_example(batch)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # after every callback's on_fit_end / on_test_end: their reports are final
        if self._should_skip(stage):
            return
        self._stop_clock()  # a fit interrupted before on_fit_end
        self.write(trainer, pl_module, stage)

    # ------------------------------------------------------------------------------ the card
    def _stop_clock(self) -> None:
        if self._fit_started is not None:
            self._duration_s += time.perf_counter() - self._fit_started
            self._fit_started = None

    def _remember_example(self, batch: Any) -> None:
        """Keep one sample's inputs (a tensor, or a dict of model keyword arguments) for the MAC count."""
        if self._example is not None or self._contract is None:
            return
        try:
            inputs = self._contract.inputs(batch)
        except BatchKeyError:
            return
        first = first_tensor(inputs, min_ndim=1)
        if first is not None and len(first):
            self._example = map_tensors(inputs, lambda t: t[:1].detach().clone() if t.ndim else t.detach().clone())

    def build(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> tuple[dict[str, Any], list[str]]:
        """The card of this run as it stands, and the standard names it does not report."""
        datamodule = getattr(trainer, "datamodule", None)
        contract = self._contract or BatchContract.resolve(self.batch_keys, trainer)
        sections, figure_paths = split_figures(collect_reports(trainer))
        # a test after fit resets callback_metrics: the card keeps the fit's last values beside the test's
        self._metrics = dict(sorted({**self._metrics, **facts.final_metrics(trainer)}.items()))
        model = facts.model_facts(pl_module, trainer, self._example)
        title = self.title or (
            f"{type(pl_module).__name__} on {type(datamodule).__name__}"
            if datamodule is not None
            else type(pl_module).__name__
        )
        data = facts.data_facts(
            datamodule, trainer, contract, self.sensitive_features, self.domain_key, self.max_data_samples
        )
        if self.datasets:
            data["datasets"] = list(self.datasets)
        return assemble_card(
            title=title,
            stage=stage,
            model=model,
            data=data,
            training=facts.training_facts(trainer, self._duration_s, facts.run_config(trainer, pl_module, datamodule)),
            metrics=self._metrics,
            sections=sections,
            figures=embed_figures(figure_paths),
            standards=self.standards,
            ran_stages=self._ran | {_STAGE_OF.get(stage, stage)},
            license=self.license,
        )

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Any]:
        """Build the card, write its files (rank zero), set :attr:`exit_code`; raise on unknown names."""
        card, unknown = self.build(trainer, pl_module, stage)
        self.card = card
        directory = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or trainer.default_root_dir)
        self.paths = {
            "json": directory / f"{CARD_STEM}.json",
            "md": directory / f"{CARD_STEM}.md",
            "html": directory / f"{CARD_STEM}.html",
        }
        _write_rank_zero(card, directory)
        summary = card["summary"]
        self.exit_code = int(self.fail_on_breach and not summary["all_met"])
        if self.verbose:
            bar = trainer.progress_bar_callback
            if bar is not None and stage:
                bar.teardown(trainer, pl_module, stage)  # close a live (rich) bar so the summary is the last output
            _print_rank_zero(standards_summary(card, str(self.paths["html"])))
        if unknown:
            raise UnknownStandardError(
                f"TrustReport (card written to {directory}): "
                + unknown_message(unknown, flatten_numbers(addressable(card), nulls=True))
            )
        return card

    # ------------------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        elapsed = self._duration_s
        if self._fit_started is not None:
            elapsed += time.perf_counter() - self._fit_started
        return {"duration_s": elapsed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._duration_s = float(state_dict.get("duration_s", 0.0))


#: The stage whose metrics a Trainer stage logs (fit: training, and validation once one ran).
_STAGE_OF = {"fit": "train", "validate": "validation", "test": "test"}


@rank_zero_only
def _write_rank_zero(card: dict[str, Any], directory: Path) -> None:
    write_card(card, directory)


@rank_zero_only
def _print_rank_zero(text: str) -> None:
    print(text, flush=True)
