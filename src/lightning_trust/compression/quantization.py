"""Quantization-aware training as a Lightning callback, and a real int8 export at the end of ``fit``.

The export side (torch.export, torchao's PT2E prepare/convert, the int8 compile and loader) lives
in :mod:`lightning_trust.compression.export`; this module is the callback that drives it.

Example:
    >>> qat = QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=3, compile=False)
    >>> qat.active, sorted(qat.report_keys)[:3]
    (False, ['accuracy_fake_quant', 'accuracy_fp32', 'accuracy_int8'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_trust.compression.checkpoints import callback_state, on_checkpoint_load
from lightning_trust.compression.examples import EXAMPLE_ROWS, example_from_spec, on_device
from lightning_trust.compression.export import (
    QAT_ATTR,
    convert_to_int8,
    float_copy,
    load_int8_model,
    quantize_prepare,
    set_batchnorm_training,
)
from lightning_trust.compression.keys import QUANTIZATION_LOGGED_KEYS, QUANTIZATION_REPORT_KEYS
from lightning_trust.compression.qat_args import check_arguments, check_torchao_freezes
from lightning_trust.compression.qat_call import CallTemplate, ForwardCall, GraphForward
from lightning_trust.compression.qat_graph import (
    freeze_graph_batchnorm,
    freeze_graph_observers,
)
from lightning_trust.compression.qat_report import QAT_EXTRA_LOGGED_KEYS, QAT_EXTRA_REPORT_KEYS, convert_and_measure
from lightning_trust.compression.qat_torchao import choose_backend, torchao_prepare, torchao_trial
from lightning_trust.core import find_callback
from lightning_trust.core.batch import BatchContract, Key
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.compat import Capability
from lightning_trust.core.loaders import split_loaders
from lightning_trust.core.passes import fork_rngs
from lightning_trust.core.seam import state_key_of

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
        backend: ``"pt2e"`` (torch.export + PT2E: conv nets), ``"torchao"`` (torchao's ``quantize_`` with
            ``QATConfig``: Linear-heavy models, :mod:`~lightning_trust.compression.qat_torchao`) or
            ``"auto"`` (torchao when most MACs of the first batch are in ``nn.Linear``, else PT2E).
        torchao_scheme: with torchao: ``"int8"`` (int8 dynamic activations and weights) or ``"int8_int4"``.
        group_size: with ``torchao_scheme="int8_int4"``: weights per int4 scale.
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
    logged_keys: ClassVar[dict[str, str]] = {**QUANTIZATION_LOGGED_KEYS, **QAT_EXTRA_LOGGED_KEYS}
    report_keys: ClassVar[dict[str, str]] = {**QUANTIZATION_REPORT_KEYS, **QAT_EXTRA_REPORT_KEYS}

    def __init__(
        self,
        start_epoch: int = 0,
        freeze_observers_epoch: Optional[int] = None,
        freeze_bn_epoch: Optional[int] = None,
        export_path: Optional[str] = None,
        compile: bool = True,
        measure_latency: bool = True,
        latency_batch_size: int = 32,
        latency_threads: int = 1,
        example_input: Any = None,
        batch_keys: Optional[dict[str, Key]] = None,
        backend: str = "pt2e",
        torchao_scheme: str = "int8",
        group_size: int = 32,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        check_arguments(start_epoch, freeze_observers_epoch, freeze_bn_epoch, export_path, latency_batch_size,
                        latency_threads, backend, torchao_scheme, group_size)  # fmt: skip
        self.backend = backend
        self.torchao_scheme = torchao_scheme
        self.group_size = group_size
        self.backend_used: Optional[str] = None if backend == "auto" else backend
        self.linear_mac_share: Optional[float] = None
        self._torchao_layers: list[str] = []
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.export_path = export_path
        self.compile = compile
        self.measure_latency = measure_latency
        self.latency_batch_size = latency_batch_size
        self.latency_threads = latency_threads
        self.example_input = example_from_spec(example_input)
        self.batch_keys = batch_keys
        self._contract: Optional[BatchContract] = None
        self._load_hook: Any = None
        self._prepared: Optional[torch.fx.GraphModule] = None
        self._example: Optional[ForwardCall] = None
        self._template: Optional[CallTemplate] = None
        self._pending_batch: Any = None
        self._float_module: Optional[pl.LightningModule] = None
        self._prepared_epoch: Optional[int] = None
        self._results: dict[str, Any] = {}
        self._figures: dict[str, str] = {}
        self.export_file: Optional[str] = None
        self.quantized_model: Optional[torch.fx.GraphModule] = None

    @property
    def state_key(self) -> str:
        return state_key_of(self, start_epoch=self.start_epoch)

    @property
    def active(self) -> bool:
        """Whether fake quantization is in the module's forward."""
        return self._prepared is not None or bool(self._torchao_layers)

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """Nothing to do in a training batch: not quantizing yet and not the start epoch."""
        return not self.active and trainer.current_epoch < self.start_epoch

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
        elif fitting and not self.active and find_callback(trainer, _pruning_class()) is None:
            self._trial(trainer, pl_module)  # pruning changes the shapes first: its own checks come first
        if self._load_hook is not None:
            self._load_hook.remove()
        self._load_hook = on_checkpoint_load(
            trainer, pl_module, lambda ckpt: self._restore_for(trainer, pl_module, ckpt)
        )

    def _check_pruning_order(self, trainer: pl.Trainer, fitting: bool) -> None:
        pruning = find_callback(trainer, _pruning_class())
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

    def _trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before training: export, prepare and convert a CPU copy on the first training batch, so a
        model that cannot be quantized is refused now, naming its module, not at ``start_epoch``."""
        inputs = self.example_input
        if inputs is None:
            loaders = split_loaders(trainer, "train")
            if not loaders or self._contract is None:
                return
            with fork_rngs():  # the loader's shuffle draws from the global generator
                inputs = self._contract.inputs(next(iter(loaders[0])))
        model = float_copy(pl_module).cpu()
        call = ForwardCall.from_inputs(model, inputs).rows(EXAMPLE_ROWS)
        if self._resolve_backend(model, call) == "torchao":
            return torchao_trial(model, call, self.torchao_scheme, self.group_size)
        prepared = quantize_prepare(model, call)
        with torch.no_grad(), fork_rngs():
            call.invoke(prepared)  # observers see one batch: the conversion needs ranges
        convert_to_int8(prepared, call)

    def _resolve_backend(self, model: Any, call: ForwardCall) -> str:
        """``backend="auto"``: decided once, on the first call, by the share of MACs in ``nn.Linear``."""
        if self.backend_used is None:
            self.backend_used, self.linear_mac_share = choose_backend(model, call)
            if self.backend_used == "torchao":
                check_torchao_freezes(self.freeze_observers_epoch, self.freeze_bn_epoch)
            rank_zero_info(
                f"QuantizationAwareTraining(backend='auto'): {self.linear_mac_share:.0%} of "
                f"{type(model).__name__}'s MACs are in nn.Linear: backend {self.backend_used!r}."
            )
        return self.backend_used

    def _restore_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        """Insert the fake-quant graph before a QAT checkpoint's weights (and observers) load into the module."""
        state = callback_state(checkpoint, type(self).__name__, self.state_key)
        if not self.active and state and state.get("prepared"):
            self.backend_used = state.get("backend", "pt2e")
            self._template = CallTemplate.from_state(state.get("template"))
            self._prepare(pl_module, ForwardCall.from_state(pl_module, state["example_input"]))
            self._apply_freezes(int(state.get("epoch", 0)))

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
        if not self.active and self.example_input is not None:
            self._start(trainer, pl_module, ForwardCall.from_inputs(pl_module, self.example_input), batch)
        elif not self.active:  # traced from the training step's own call of the module
            self._pending_batch = batch
            pl_module.__dict__["forward"] = _FirstCall(self, trainer, pl_module)
        self._apply_freezes(trainer.current_epoch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_batch is None:
            return
        self._pending_batch = None
        graph_forward = pl_module.__dict__.get("forward")
        if not self.active or (isinstance(graph_forward, GraphForward) and graph_forward.calls == 0):
            pl_module.__dict__.pop("forward", None)
            raise RuntimeError(
                f"QuantizationAwareTraining routes {type(pl_module).__name__}'s forward through the fake-quantized "
                "graph, but training_step never called it. Call the model as `self(...)` (or `self.forward(...)`) "
                "in training_step, not a submodule directly."
            )
        from lightning_trust.core.seam import rewrap_ddp

        if self._prepared is not None:  # torchao's swap keeps every parameter and adds no buffer
            rewrap_ddp(trainer)  # the observers are new buffers DDP must know (not inside the step's forward)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, call: ForwardCall, batch: Any) -> None:
        self._template = CallTemplate.match(call, batch)
        self._prepare(pl_module, call)
        self._prepared_epoch = trainer.current_epoch
        self._pending_batch = batch  # checked at batch end: the step must have called the graph
        self._apply_freezes(trainer.current_epoch)
        rank_zero_info(f"QuantizationAwareTraining: fake quantization inserted at epoch {trainer.current_epoch}.")

    def _prepare(self, pl_module: pl.LightningModule, call: ForwardCall) -> None:
        self._float_module = pl_module
        self._example = call.rows(EXAMPLE_ROWS)
        if self._resolve_backend(pl_module, call) == "torchao":
            self._torchao_layers = torchao_prepare(pl_module, self.torchao_scheme, self.group_size)
            pl_module.__dict__.pop("forward", None)  # the user's own forward, through the swapped layers
            return
        prepared = quantize_prepare(
            pl_module, call.map(lambda t: on_device(t, pl_module))
        )  # raises before anything is attached
        prepared.train(pl_module.training)
        pl_module.add_module(QAT_ATTR, prepared)
        pl_module.__dict__["forward"] = GraphForward(pl_module, prepared, call)  # the user's class is unchanged
        self._prepared = prepared

    def _apply_freezes(self, epoch: int) -> None:
        if self._prepared is None:
            return
        if self.freeze_observers_epoch is not None and epoch >= self.freeze_observers_epoch:
            freeze_graph_observers(self._prepared)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            freeze_graph_batchnorm(self._prepared)  # kept through every later .train()/.eval()

    def call_for_batch(self, batch: Any) -> ForwardCall:
        """The traced call made from a batch of the loaders (validation, latency)."""
        if self._template is not None:
            return self._template.call(batch)
        return ForwardCall.from_inputs(self._float_module, self._contract.inputs(batch))  # type: ignore[union-attr]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "prepared": self.active,
            "backend": self.backend_used,
            "example_input": self._example.to_state() if self._example is not None else None,
            "template": self._template.to_state() if self._template is not None else None,
            "prepared_epoch": self._prepared_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._prepared_epoch = state_dict.get("prepared_epoch")

    # conversion ------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active:
            return
        self._results = convert_and_measure(self, trainer, pl_module)
        rank_zero_info(
            "QuantizationAwareTraining: int8 model "
            + ", ".join(f"{k}={v:.4g}" for k, v in self._results.items() if isinstance(v, float))
        )

    def report(self) -> dict[str, Any]:
        """The int8 export and its measurements against fp32 (see :attr:`report_keys`)."""
        out = {"active": self.active, "start_epoch": self.start_epoch, **self._results}
        if self._figures:
            out["figures"] = dict(self._figures)
        return out


class _FirstCall:
    """The module's forward for one call: the training step's own call is traced, then run fake-quantized."""

    def __init__(self, callback: QuantizationAwareTraining, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.callback, self.trainer, self.module = callback, trainer, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = ForwardCall.bind(self.module, args, kwargs)
        self.callback._start(self.trainer, self.module, call, self.callback._pending_batch)
        forward = self.module.__dict__.get("forward")
        if forward is None:  # torchao: the module's own forward runs the fake-quantized layers
            return type(self.module).forward(self.module, *args, **kwargs)
        return forward(*args, **kwargs)


def _pruning_class() -> type:
    from lightning_trust.compression.pruning import ProgressivePruning

    return ProgressivePruning
