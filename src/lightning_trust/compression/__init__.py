"""lightning_trust.compression: structural pruning (torch-pruning) and quantization-aware training
(torchao PT2E) as Lightning callbacks that chain: prune progressively, train quantization-aware, export int8.

==================== ===========================================================================
module               concern
==================== ===========================================================================
``pruning``          the :class:`ProgressivePruning` callback
``pruning_args``     its arguments' checks, capabilities and refusals
``schedule``         when pruning steps happen and how far each one prunes
``pruner``           the torch-pruning pruner: importances, tracing, dense counts, one pruning step
``structure``        tracing with torch-pruning, recorded operations, replay, loading pruned models
``optimizer_state``  optimizer state carried across a pruning step
``pruning_report``   size, MACs, latency and accuracy before/after, step records, the figure, the report
``quantization``     the :class:`QuantizationAwareTraining` callback
``export``           torch.export / PT2E: prepare, convert, compile and load int8 models
``export_refusal``   the deepest module torch.export cannot capture, and its fix
``qat_call``         the module's own call signature: canonical calls, the routed forward, batch templates
``qat_graph``        the fake-quant graph's train/eval switch, freezing, training-mode op check
``qat_report``       int8 conversion, export and measurements at the end of fit
``qat_torchao``      the torchao backend: ``quantize_`` with ``QATConfig`` for Linear-heavy models
``qat_args``         QuantizationAwareTraining's arguments and backends, checked before training
``measure``          CPU latency, accuracy and agreement over loaders
``examples``         example inputs kept to trace, export and time with
``checkpoints``      reading a checkpoint before Lightning loads its weights
``keys``             the logged metric names and report keys both callbacks declare
==================== ===========================================================================

Example:
    >>> from lightning_trust.compression import ProgressivePruning, QuantizationAwareTraining
    >>> ProgressivePruning(pruning_ratio=0.5, end_epoch=3).events(), QuantizationAwareTraining(start_epoch=5).start_epoch
    ([1, 2, 3], 5)
"""

from lightning_trust.compression.export import convert_to_int8, load_int8_model, quantize_prepare
from lightning_trust.compression.pruning import ProgressivePruning
from lightning_trust.compression.quantization import QuantizationAwareTraining
from lightning_trust.compression.schedule import pruning_schedule
from lightning_trust.compression.structure import load_pruned_checkpoint, output_layers, restore_pruned_structure
from lightning_trust.core.macs import count_macs_params

__all__ = [
    "ProgressivePruning",
    "QuantizationAwareTraining",
    "convert_to_int8",
    "count_macs_params",
    "load_int8_model",
    "load_pruned_checkpoint",
    "output_layers",
    "pruning_schedule",
    "quantize_prepare",
    "restore_pruned_structure",
]
