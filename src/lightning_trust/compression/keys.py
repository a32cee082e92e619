"""What the compression callbacks declare they log and report: metric name (``<placeholder>`` parts
match any text) or top-level ``report()`` key -> its one-line meaning.

The callbacks carry them as their ``logged_keys`` / ``report_keys`` ClassVars, which the docs are
generated from and a test checks against real runs.

Example:
    >>> sorted(PRUNING_LOGGED_KEYS)[:2]
    ['compression/channel_ratio', 'compression/distillation_loss']
    >>> QUANTIZATION_REPORT_KEYS["speedup"] == QUANTIZATION_LOGGED_KEYS["quantization/speedup"]
    True
"""

from __future__ import annotations

__all__ = ["PRUNING_LOGGED_KEYS", "PRUNING_REPORT_KEYS", "QUANTIZATION_LOGGED_KEYS", "QUANTIZATION_REPORT_KEYS"]

#: What :class:`~lightning_trust.compression.ProgressivePruning` logs, once per pruning step.
PRUNING_LOGGED_KEYS: dict[str, str] = {
    "compression/params": "parameters after a pruning step",
    "compression/macs": "MACs of one sample after a pruning step",
    "compression/channel_ratio": "share of output channels removed after a pruning step, measured",
    "compression/macs_ratio": "MACs after a pruning step / dense MACs",
    "compression/distillation_loss": "with `distill`: the epoch's mean distillation term (before its weight)",
}

#: The top-level keys of :meth:`ProgressivePruning.report() <lightning_trust.compression.ProgressivePruning.report>`.
PRUNING_REPORT_KEYS: dict[str, str] = {
    "method": "the pruning method (torch-pruning structural)",
    "importance": "the channel importance",
    "schedule": "the pruning schedule",
    "global_pruning": "whether channels were ranked across layers",
    "channel_ratio": "share of output channels removed at the end, measured on the layers (not the target)",
    "steps_done": "pruning steps done",
    "params_before": "parameters of the dense model",
    "params_after": "parameters of the pruned model",
    "macs_before": "MACs of one sample, dense model",
    "macs_after": "MACs of one sample, pruned model",
    "param_ratio": "params_after / params_before",
    "macs_ratio": "macs_after / macs_before",
    "latency_before_ms": "median CPU latency of the dense model per batch",
    "latency_after_ms": "median CPU latency of the pruned model per batch",
    "speedup": "dense latency / pruned latency",
    "accuracy_before": "validation accuracy before the first pruning step",
    "accuracy_after": "validation accuracy at the end of fit",
    "heads_before": "attention heads per layer of the dense model (None without modules exposing their heads)",
    "heads_after": "attention heads per layer at the end",
    "hidden_before": "residual-stream width per attention layer, dense (the config's hidden_size)",
    "hidden_after": "residual-stream width per attention layer at the end",
    "mlp_width_before": "MLP width per layer, dense (the config's intermediate_size)",
    "mlp_width_after": "MLP width per layer at the end",
    "distillation": "with `distill`: temperature, weight, distilled steps and the last distillation loss (else None)",
    "steps": "per pruning step: epoch, step, target, measured channel ratio, params, MACs and their ratios",
}

#: What :class:`~lightning_trust.compression.QuantizationAwareTraining` logs at the end of fit.
QUANTIZATION_LOGGED_KEYS: dict[str, str] = {
    "quantization/size_fp32_bytes": "bytes of the fp32 program's weights",
    "quantization/size_int8_bytes": "bytes of the int8 program's weights",
    "quantization/size_ratio": "fp32 weight bytes / int8 weight bytes",
    "quantization/accuracy_fp32": "validation accuracy of the float model",
    "quantization/accuracy_fake_quant": "validation accuracy of the fake-quantized model",
    "quantization/accuracy_int8": "validation accuracy of the exported int8 model",
    "quantization/agreement": "share of validation samples where int8 and fake-quant predict the same class",
    "quantization/file_size_fp32_bytes": "size of the saved fp32 reference .pt2 file",
    "quantization/file_size_int8_bytes": "size of the saved int8 .pt2 file",
    "quantization/latency_fp32_ms": "median CPU latency of the fp32 model per batch",
    "quantization/latency_int8_ms": "median CPU latency of the int8 model per batch",
    "quantization/speedup": "fp32 latency / int8 latency",
}

#: The top-level keys of
#: :meth:`QuantizationAwareTraining.report() <lightning_trust.compression.QuantizationAwareTraining.report>`.
QUANTIZATION_REPORT_KEYS: dict[str, str] = {
    "active": "whether fake quantization was inserted",
    "start_epoch": "epoch at which fake quantization was inserted",
    "backend": "the quantization backend",
    "export_path": "where the int8 program was saved",
    "int8_compiled": "whether the int8 latency was measured compiled with torch.compile",
    **{key.split("/", 1)[1]: meaning for key, meaning in QUANTIZATION_LOGGED_KEYS.items()},
}
