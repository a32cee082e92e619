"""Quantization-aware training as a Lightning callback, and a real int8 export at the end of ``fit``.

The export side (torch.export, torchao's PT2E prepare/convert, the int8 compile and loader) lives
in :mod:`lightning_trust.compression.export`; this module is the callback that drives it.

Example:
    >>> qat = QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=3, compile=False)
    >>> qat.active, sorted(qat.report_keys)[:3]
    (False, ['accuracy_fake_quant', 'accuracy_fp32', 'accuracy_int8'])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_trust.compression.checkpoints import callback_state, on_checkpoint_load
from lightning_trust.compression.examples import (
    example_batch_size,
    example_from,
    example_from_spec,
    on_device,
    repeat_rows,
)
from lightning_trust.compression.export import (
    QAT_ATTR,
    compile_int8,
    convert_to_int8,
    export_dynamic_batch,
    load_int8_model,
    plain_forward,
    program_bytes,
    quantize_prepare,
    set_batchnorm_training,
)
from lightning_trust.compression.keys import QUANTIZATION_LOGGED_KEYS, QUANTIZATION_REPORT_KEYS
from lightning_trust.compression.measure import collect_predictions, measure_latency, reduced_mean
from lightning_trust.core import artifact_dir, find_callback, new_figure, save_figure, write_json
from lightning_trust.core.batch import BatchContract, Key
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability
from lightning_trust.core.loaders import split_loaders
from lightning_trust.core.tensors import map_tensors

__all__ = [
    "QAT_ATTR",
    "QuantizationAwareTraining",
    "convert_to_int8",
    "load_int8_model",
    "quantize_prepare",
    "set_batchnorm_training",
]


class QuantizationAwareTraining(TrustCallback):
    """Train quantization-aware from ``start_epoch``, then convert to a real int8 model and export it.

    At the first training batch of ``start_epoch`` the LightningModule's forward is exported with
    ``torch.export`` and fake quantization is inserted by torchao's ``prepare_qat_pt2e`` (X86
    Inductor quantizer: per-channel int8 weights, uint8 activations). The user's class is not
    changed: the instance's forward is routed through the fake-quantized graph, which shares the
    parameters, so the optimizer and LR schedulers keep working. Observers and BatchNorm statistics
    can be frozen at given epochs. At the end of ``fit`` a copy is converted (``convert_pt2e``),
    exported (``export_path``) and measured against fp32: size, CPU latency (``torch.compile``),
    validation accuracy and agreement with the fake-quantized model. The module itself is left
    on its float weights with fake quantization, never half-converted.

    Args:
        start_epoch: epoch at which fake quantization is inserted (after pruning, when chained).
        freeze_observers_epoch: from this epoch the quantization ranges stop updating.
        freeze_bn_epoch: from this epoch BatchNorm uses (and stops updating) its running statistics.
        export_path: where the int8 ``torch.export`` program goes (``.pt2``); default
            ``<log_dir>/lightning_trust/quantization/model_int8.pt2``. Load it with :func:`load_int8_model`.
        compile: measure the int8 model compiled with ``torch.compile`` (Inductor lowers the int8
            patterns to real int8 kernels; without it the decomposed graph runs in fp32 arithmetic).
        measure_latency: measure fp32 vs int8 CPU latency for the report.
        example_input: a tensor or a shape list; default: the first training batch's inputs.
        batch_keys: where inputs/targets are in a batch (see :class:`~lightning_trust.core.batch.BatchContract`).
        name: the report section (default ``"quantization"``).

    Example:
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[ProgressivePruning(pruning_ratio=0.5, end_epoch=3),
        ...                                              QuantizationAwareTraining(start_epoch=5)])  # doctest: +SKIP
        >>> trainer.fit(SmallCNN(), DigitsDataModule())  # doctest: +SKIP
        >>> int8 = load_int8_model(trainer.callbacks[1].export_file)  # doctest: +SKIP
    """

    report_section = "quantization"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.EXPORTED_GRAPH})
    refuses: ClassVar[Mapping[Capability, str]] = {
        Capability.PER_SAMPLE_GRADIENTS: (
            "the fake-quantized graph runs instead of the layers where Opacus computes per-sample gradients, so "
            "clipping would have nothing to clip. Train privately first; quantization-aware fine-tuning on the "
            "private data afterwards is not covered by ε (fine-tune on public data, or keep the DP model in float)"
        )
    }
    logged_keys: ClassVar[dict[str, str]] = QUANTIZATION_LOGGED_KEYS
    report_keys: ClassVar[dict[str, str]] = QUANTIZATION_REPORT_KEYS

    def __init__(
        self,
        start_epoch: int = 0,
        freeze_observers_epoch: Optional[int] = None,
        freeze_bn_epoch: Optional[int] = None,
        export_path: Optional[str] = None,
        compile: bool = True,
        measure_latency: bool = True,
        example_input: Any = None,
        batch_keys: Optional[dict[str, Key]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        if start_epoch < 0:
            raise ValueError(f"`start_epoch` must be >= 0, got {start_epoch}.")
        for arg, value in (("freeze_observers_epoch", freeze_observers_epoch), ("freeze_bn_epoch", freeze_bn_epoch)):
            if value is not None and value < start_epoch:
                raise ValueError(
                    f"`{arg}` ({value}) must be >= `start_epoch` ({start_epoch}): nothing is quantized before."
                )
        if export_path is not None and not str(export_path).endswith(".pt2"):
            raise ValueError(f"`export_path` must end with '.pt2' (a torch.export program), got {export_path!r}.")
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.export_path = export_path
        self.compile = compile
        self.measure_latency = measure_latency
        self.example_input = example_from_spec(example_input)
        self.batch_keys = batch_keys
        self._contract: Optional[BatchContract] = None
        self._load_hook: Any = None
        self._prepared: Optional[torch.fx.GraphModule] = None
        self._example: Any = None
        self._latency_batch = 1
        self._prepared_epoch: Optional[int] = None
        self._results: dict[str, Any] = {}
        self._figures: dict[str, str] = {}
        self.export_file: Optional[str] = None
        self.quantized_model: Optional[torch.fx.GraphModule] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start_epoch=self.start_epoch)

    @property
    def active(self) -> bool:
        """Whether fake quantization is in the module's forward."""
        return self._prepared is not None

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """Nothing to do in a training batch: not quantizing yet and not the start epoch."""
        return self._prepared is None and trainer.current_epoch < self.start_epoch

    # lifecycle -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._contract = BatchContract.resolve(self.batch_keys, trainer)
        fitting = stage == TrainerFn.FITTING
        self._check_pruning_order(trainer, fitting)
        never = fitting and trainer.max_epochs is not None and 0 < trainer.max_epochs <= self.start_epoch
        if never and getattr(trainer, "fast_dev_run", False):
            rank_zero_info(f"fast_dev_run: QuantizationAwareTraining(start_epoch={self.start_epoch}) does not start.")
        elif never:
            raise ValueError(
                f"QuantizationAwareTraining(start_epoch={self.start_epoch}) never starts with max_epochs={trainer.max_epochs}."
            )
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = on_checkpoint_load(
            trainer, pl_module, lambda ckpt: self._restore_for(trainer, pl_module, ckpt)
        )

    def _check_pruning_order(self, trainer: pl.Trainer, fitting: bool) -> None:
        from lightning_trust.compression.pruning import ProgressivePruning

        pruning = find_callback(trainer, ProgressivePruning)
        if pruning is None:
            return
        if trainer.callbacks.index(pruning) > trainer.callbacks.index(self):  # type: ignore[attr-defined]
            raise ValueError(
                "Put ProgressivePruning before QuantizationAwareTraining in `callbacks`: a checkpoint's pruned "
                "structure must be rebuilt before the quantized graph is traced from it."
            )
        last = pruning.events(trainer.max_epochs)[-1] if fitting else None
        if last is not None and last >= self.start_epoch:
            raise ValueError(
                f"QuantizationAwareTraining(start_epoch={self.start_epoch}) starts before pruning ends (last pruning "
                f"step at epoch {last}): the quantized graph fixes the layer shapes. Set `start_epoch` after the "
                "pruning's `end_epoch`."
            )

    def _restore_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        """Insert the fake-quant graph before a QAT checkpoint's weights (and observers) load into the module."""
        state = callback_state(checkpoint, type(self).__name__, self.state_key)
        if self._prepared is None and state and state.get("prepared"):
            self._example = state["example_input"]
            self._prepare(trainer, pl_module, rewrap=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._should_skip(trainer):
            return
        if self._prepared is None:
            self._start(trainer, pl_module, batch)
        self._apply_freezes(trainer.current_epoch)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        inputs = self.example_input if self.example_input is not None else self._contract.inputs(batch)  # type: ignore[union-attr]
        self._example = example_from(inputs)
        self._latency_batch = example_batch_size(inputs)
        self._prepare(trainer, pl_module)
        self._prepared_epoch = trainer.current_epoch
        rank_zero_info(f"QuantizationAwareTraining: fake quantization inserted at epoch {trainer.current_epoch}.")

    def _prepare(self, trainer: Any, pl_module: pl.LightningModule, rewrap: bool = True) -> None:
        from lightning_trust.core.seam import rewrap_ddp

        prepared = quantize_prepare(
            pl_module, on_device(self._example, pl_module)
        )  # raises before anything is attached
        if not pl_module.training:
            prepared.eval()
        pl_module.add_module(QAT_ATTR, prepared)
        pl_module.__dict__["forward"] = prepared.forward  # instance-level: the user's class is unchanged
        self._prepared = prepared
        if rewrap:
            rewrap_ddp(trainer)  # the observers are new buffers DDP must know

    def _apply_freezes(self, epoch: int) -> None:
        from torchao.quantization.pt2e import disable_observer

        if self._prepared is None:
            return
        if self.freeze_observers_epoch is not None and epoch >= self.freeze_observers_epoch:
            self._prepared.apply(disable_observer)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            # Lightning's .train() swaps the train-mode BN pattern back in: re-apply every batch (cheap, idempotent)
            set_batchnorm_training(self._prepared, False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "prepared": self._prepared is not None,
            "example_input": self._example,
            "latency_batch": self._latency_batch,
            "prepared_epoch": self._prepared_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._example = state_dict.get("example_input", self._example)
        self._latency_batch = int(state_dict.get("latency_batch", 1))
        self._prepared_epoch = state_dict.get("prepared_epoch")

    # conversion ------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._prepared is None:
            return
        self._results = self._convert_and_measure(trainer, pl_module)
        rank_zero_info(
            "QuantizationAwareTraining: int8 model "
            + ", ".join(f"{k}={v:.4g}" for k, v in self._results.items() if isinstance(v, float))
        )

    def _convert_and_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from torchao.quantization.pt2e import move_exported_model_to_eval

        assert self._prepared is not None
        example = map_tensors(self._example, lambda t: t.cpu())
        fake_quant = copy.deepcopy(self._prepared).cpu()
        move_exported_model_to_eval(fake_quant)
        if self.freeze_bn_epoch is not None:
            set_batchnorm_training(fake_quant, False)
        converted, int8_program = convert_to_int8(self._prepared, example)
        with plain_forward(pl_module):
            fp32 = copy.deepcopy(pl_module).cpu().eval()
        fp32_program = export_dynamic_batch(fp32, example)
        self.quantized_model = converted
        results: dict[str, Any] = {
            "backend": "x86_inductor (torchao PT2E)",
            "size_fp32_bytes": program_bytes(fp32_program),
            "size_int8_bytes": program_bytes(int8_program),
        }
        results["size_ratio"] = results["size_fp32_bytes"] / results["size_int8_bytes"]
        int8_runner: Any = compile_int8(converted) if self.compile else int8_program.module()
        loaders = split_loaders(trainer, "val")
        if loaders and self._contract is not None:
            models = {"fp32": fp32, "fake_quant": fake_quant, "int8": int8_runner}
            preds, target = collect_predictions(models, loaders, self._contract, torch.device("cpu"))
            if target.numel():
                results["accuracy_fp32"] = reduced_mean(trainer, (preds["fp32"] == target).float())
                results["accuracy_fake_quant"] = reduced_mean(trainer, (preds["fake_quant"] == target).float())
                results["accuracy_int8"] = reduced_mean(trainer, (preds["int8"] == target).float())
                results["agreement"] = reduced_mean(trainer, (preds["int8"] == preds["fake_quant"]).float())
        folder = artifact_dir(trainer, "quantization")  # on every rank: log_dir is a collective under DDP
        if not trainer.is_global_zero:
            return results
        export_file = Path(self.export_path) if self.export_path else folder / "model_int8.pt2"
        export_file.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(int8_program, str(export_file))
        fp32_file = export_file.with_name(f"{export_file.stem}.fp32_reference.pt2")
        torch.export.save(fp32_program, str(fp32_file))
        self.export_file = str(export_file)
        results["export_path"] = str(export_file)
        results["file_size_fp32_bytes"] = fp32_file.stat().st_size
        results["file_size_int8_bytes"] = export_file.stat().st_size
        if self.measure_latency:
            batch = repeat_rows(example, self._latency_batch)
            results["latency_fp32_ms"] = measure_latency(fp32, batch) * 1e3
            results["latency_int8_ms"] = measure_latency(int8_runner, batch) * 1e3
            results["speedup"] = results["latency_fp32_ms"] / results["latency_int8_ms"]
            results["int8_compiled"] = self.compile
        self._results = results
        numbers = {
            f"quantization/{k}": float(v)
            for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=trainer.global_step)
        self._figures = {"int8_vs_fp32": str(folder / "int8_vs_fp32.png")}
        write_json(folder / "quantization.json", self.report())
        save_figure(trainer, self._figure(), folder / "int8_vs_fp32.png", tag="quantization/int8_vs_fp32")
        return results

    def _figure(self) -> Any:
        r = self._results
        panels = [("size (KiB)", r.get("size_fp32_bytes", 0) / 1024, r.get("size_int8_bytes", 0) / 1024)]
        if "latency_fp32_ms" in r:
            panels.append(("CPU latency (ms)", r["latency_fp32_ms"], r["latency_int8_ms"]))
        if r.get("accuracy_fp32") is not None:
            panels.append(("val accuracy", r["accuracy_fp32"], r["accuracy_int8"]))
        fig = new_figure(figsize=(3.0 * len(panels), 3.2))
        for i, (title, fp32, int8) in enumerate(panels, start=1):
            ax = fig.add_subplot(1, len(panels), i)
            ax.bar(["fp32", "int8"], [fp32, int8], color=["#888888", "#2a7ab9"])
            ax.set_title(title)
        fig.suptitle("QuantizationAwareTraining: int8 vs fp32")
        fig.tight_layout()
        return fig

    def report(self) -> dict[str, Any]:
        """The int8 export and its measurements against fp32 (see :attr:`report_keys`)."""
        out = {"active": self.active, "start_epoch": self.start_epoch, **self._results}
        if self._figures:
            out["figures"] = dict(self._figures)
        return out
