"""lightning_trust.compression: structural pruning (torch-pruning) and quantization-aware training
(torchao PT2E) as Lightning callbacks that chain: prune progressively, train quantization-aware, export int8."""

from lightning_trust.compression.pruning import (
    ProgressivePruning,
    count_macs_params,
    load_pruned_checkpoint,
    output_layers,
    pruning_schedule,
    restore_pruned_structure,
)
from lightning_trust.compression.quantization import (
    QuantizationAwareTraining,
    convert_to_int8,
    load_int8_model,
    quantize_prepare,
)

__all__ = [
    "QuantizationAwareTraining",
    "convert_to_int8",
    "load_int8_model",
    "quantize_prepare",
    "ProgressivePruning",
    "count_macs_params",
    "load_pruned_checkpoint",
    "output_layers",
    "pruning_schedule",
    "restore_pruned_structure",
]
