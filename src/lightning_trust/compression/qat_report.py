"""What QuantizationAwareTraining does at the end of fit: convert to int8, export, and measure the
int8 program against fp32 (size, accuracy, agreement, determinism, latency and whether int8 pays
off on this machine).

Example:
    >>> pays_off(2.98), pays_off(0.46)
    (True, False)
    >>> sorted(QAT_EXTRA_REPORT_KEYS)[:4]
    ['cpu_capability', 'float_weight_layers', 'int8_deterministic', 'int8_pays_off']
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from lightning_trust.compression.examples import repeat_rows
from lightning_trust.compression.export import (
    compile_int8,
    convert_to_int8,
    export_call,
    float_copy,
    program_bytes,
)
from lightning_trust.compression.measure import collect_predictions, measure_latency, reduced_mean
from lightning_trust.compression.qat_call import ForwardCall
from lightning_trust.compression.qat_graph import sync_graph_mode
from lightning_trust.compression.qat_torchao import SCHEMES, cpu_capability, float_reference, torchao_convert
from lightning_trust.core import artifact_dir, new_figure, save_figure, warn_once, write_json
from lightning_trust.core.loaders import split_loaders

__all__ = ["QAT_EXTRA_LOGGED_KEYS", "QAT_EXTRA_REPORT_KEYS", "convert_and_measure", "pays_off", "qat_figure"]

#: Logged at the end of fit besides :data:`~lightning_trust.compression.keys.QUANTIZATION_LOGGED_KEYS`.
QAT_EXTRA_LOGGED_KEYS: dict[str, str] = {
    "quantization/latency_batch_size": "batch size the latencies were measured at",
    "quantization/latency_threads": "CPU threads the latencies were measured with",
    "quantization/int8_weight_share": "int8 weight elements in the program / weight elements (2-D and up) of the fp32 model",
    "quantization/linear_mac_share": "with backend='auto': share of the first batch's MACs in nn.Linear (chose the backend)",
}
#: Reported besides :data:`~lightning_trust.compression.keys.QUANTIZATION_REPORT_KEYS`.
QAT_EXTRA_REPORT_KEYS: dict[str, str] = {
    "int8_pays_off": "whether the int8 program is faster than fp32 on this machine (speedup > 1)",
    "int8_deterministic": "whether the int8 program gives bit-identical outputs on the same input twice",
    "float_weight_layers": "layer types with weights the quantizer left in float (embeddings, non-Linear matmuls)",
    "torchao_scheme": "with backend='torchao': the quantize_ scheme (int8, int8_int4), else None",
    "cpu_capability": "the CPU's vector ISA PyTorch uses (int8 matmuls need AVX512-VNNI or AMX to beat fp32)",
    **{key.split("/", 1)[1]: meaning for key, meaning in QAT_EXTRA_LOGGED_KEYS.items()},
}


#: layer types the X86 Inductor quantizer turns into int8 kernels
_QUANTIZED_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)


def weight_share(fp32: torch.nn.Module, int8_program: Any) -> tuple[float, list[str]]:
    """The share of the fp32 model's weight elements (tensors of 2 dims and more) held as int8 in
    the program, and the types of the layers with such weights that are not Linear/Conv."""
    total = sum(p.numel() for p in fp32.parameters() if p.ndim >= 2)
    tensors = list(int8_program.state_dict.values()) + list(int8_program.constants.values())
    int8 = sum(t.numel() for t in tensors if isinstance(t, torch.Tensor) and t.dtype == torch.int8)
    others = sorted(
        {
            type(m).__name__
            for m in fp32.modules()
            if not isinstance(m, _QUANTIZED_TYPES) and any(p.ndim >= 2 for p in m.parameters(recurse=False))
        }
    )
    return (int8 / total if total else 0.0), others


def pays_off(speedup: float) -> bool:
    """Whether int8 is worth deploying for speed: strictly faster than fp32."""
    return speedup > 1.0


def _outputs_equal(a: Any, b: Any) -> bool:
    from lightning_trust.core.tensors import iter_tensors

    left, right = list(iter_tensors(a)), list(iter_tensors(b))
    return len(left) == len(right) and all(torch.equal(x, y) for x, y in zip(left, right))


def _latencies(cb: Any, fp32: Any, int8: Any, example: ForwardCall) -> dict[str, Any]:
    batch = example.map(lambda t: repeat_rows(t, cb.latency_batch_size) if t.ndim > 0 else t)
    threads = torch.get_num_threads()
    torch.set_num_threads(cb.latency_threads)
    try:
        fp32_runner = compile_int8(fp32) if cb.compile else fp32  # the same compiler for both: a fair speedup
        out = {
            "latency_fp32_ms": measure_latency(fp32_runner, batch, call=_invoke) * 1e3,
            "latency_int8_ms": measure_latency(int8, batch, call=_invoke) * 1e3,
        }
    finally:
        torch.set_num_threads(threads)
    out["speedup"] = out["latency_fp32_ms"] / out["latency_int8_ms"]
    out.update(
        int8_pays_off=pays_off(out["speedup"]),
        int8_compiled=cb.compile,
        latency_batch_size=cb.latency_batch_size,
        latency_threads=cb.latency_threads,
    )
    return out


def _invoke(model: Any, call: ForwardCall) -> Any:
    return call.invoke(model)


def _accuracies(cb: Any, trainer: Any, models: dict[str, Any]) -> dict[str, Any]:
    """Accuracies against the targets, and int8/fake-quant agreement (also without targets)."""
    loaders = split_loaders(trainer, "val")
    if not loaders or cb._contract is None:
        return {}
    first = next(iter(loaders[0]), None)
    if first is None:
        return {}
    labelled = cb._contract.has_target(first)
    preds, target = collect_predictions(
        models, loaders, cb._contract, torch.device("cpu"), inputs_of=cb.call_for_batch, call=_invoke,
        with_target=labelled,
    )  # fmt: skip
    if labelled:
        keep = target != -100  # Hugging Face's ignored label (padding of a language model's tokens)
        preds, target = {name: p[keep] for name, p in preds.items()}, target[keep]
    if not preds["int8"].numel():
        return {}
    out = {"agreement": reduced_mean(trainer, (preds["int8"] == preds["fake_quant"]).float())}
    if labelled:
        for name in ("fp32", "fake_quant", "int8"):
            out[f"accuracy_{name}"] = reduced_mean(trainer, (preds[name] == target).float())
    return out


#: what each backend quantizes, for the refusal of a model left mostly in float
_QUANTIZES = {
    "pt2e": "the X86 Inductor quantizer annotates nn.Linear/nn.Conv",
    "torchao": "torchao's quantize_ swaps nn.Linear layers",
}


def _pt2e_models(cb: Any, pl_module: Any, example: ForwardCall) -> tuple[Any, Any, Any, Any]:
    """The fake-quant graph (eval), the converted int8 graph and its program, and the fp32 model."""
    fake_quant = copy.deepcopy(cb._prepared).cpu()
    sync_graph_mode(fake_quant.eval())  # a deep copy keeps the flag, not the installed switch
    converted, int8_program = convert_to_int8(cb._prepared, example)
    return fake_quant, converted, int8_program, float_copy(pl_module).cpu().eval()


def _torchao_models(cb: Any, pl_module: Any, example: ForwardCall) -> tuple[Any, Any, Any, Any]:
    """The fake-quantized module (an eval copy), its int8 conversion and program, and the fp32 model."""
    from lightning_trust.compression.export import plain_forward

    with plain_forward(pl_module):
        fake_quant = copy.deepcopy(pl_module).cpu().eval()
    converted, int8_program = torchao_convert(pl_module, cb.torchao_scheme, example, cb.group_size)
    return fake_quant, converted, int8_program, float_reference(pl_module)


def convert_and_measure(cb: Any, trainer: Any, pl_module: Any) -> dict[str, Any]:
    """Convert ``cb``'s QAT model to int8, export it next to an fp32 reference, and measure both."""
    assert cb.active and cb._example is not None
    example: ForwardCall = cb._example.map(lambda t: t.cpu())
    torchao = cb.backend_used == "torchao"
    fake_quant, converted, int8_program, fp32 = (_torchao_models if torchao else _pt2e_models)(cb, pl_module, example)
    with torch.no_grad():
        fp32_program = export_call(fp32, example)
    results: dict[str, Any] = {
        "backend": SCHEMES[cb.torchao_scheme] if torchao else "x86_inductor (torchao PT2E)",
        "torchao_scheme": cb.torchao_scheme if torchao else None,
        "linear_mac_share": cb.linear_mac_share,
        "cpu_capability": cpu_capability(),
        "size_fp32_bytes": program_bytes(fp32_program),
        "size_int8_bytes": program_bytes(int8_program),
    }
    results["size_ratio"] = results["size_fp32_bytes"] / results["size_int8_bytes"]
    results["int8_weight_share"], results["float_weight_layers"] = weight_share(fp32, int8_program)
    if results["int8_weight_share"] < 0.5:
        warn_once(
            cb,
            "few_int8",
            f"QuantizationAwareTraining: only {results['int8_weight_share']:.0%} of {type(pl_module).__name__}'s weights "
            f"are int8; {_QUANTIZES['torchao' if torchao else 'pt2e']}, and these layers stay float: "
            f"{results['float_weight_layers']}. Replace them with nn.Linear (e.g. transformers' Conv1D) to quantize "
            "them, or keep this model in float.",
        )
    int8_runner: Any = compile_int8(converted) if cb.compile else int8_program.module()
    with torch.no_grad():
        results["int8_deterministic"] = _outputs_equal(example.invoke(int8_runner), example.invoke(int8_runner))
    results.update(_accuracies(cb, trainer, {"fp32": fp32, "fake_quant": fake_quant, "int8": int8_runner}))
    folder = artifact_dir(trainer, "quantization")  # on every rank: log_dir is a collective under DDP
    if not trainer.is_global_zero:
        return results
    export_file = Path(cb.export_path) if cb.export_path else folder / "model_int8.pt2"
    export_file.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(int8_program, str(export_file))
    fp32_file = export_file.with_name(f"{export_file.stem}.fp32_reference.pt2")
    torch.export.save(fp32_program, str(fp32_file))
    cb.export_file = str(export_file)
    cb.quantized_model = converted
    results["export_path"] = str(export_file)
    results["file_size_fp32_bytes"] = fp32_file.stat().st_size
    results["file_size_int8_bytes"] = export_file.stat().st_size
    if cb.measure_latency:
        results.update(_latencies(cb, fp32, int8_runner, example))
        if not results["int8_pays_off"]:
            warn_once(
                cb,
                "int8_slower",
                f"QuantizationAwareTraining: the int8 program is slower than fp32 on this machine "
                f"({results['speedup']:.2f}x at batch {cb.latency_batch_size}, {cb.latency_threads} thread(s), "
                f"{'both compiled' if cb.compile else 'eager'}, CPU {results['cpu_capability']}: int8 matmul kernels "
                "beat fp32 with AVX512-VNNI or AMX, and on small layers the quantize/dequantize steps dominate); "
                "`int8_pays_off` is False in the report. Keep fp32 "
                "for CPU speed here"
                + ("" if cb.compile else ", or set `compile=True` (int8 kernels need Inductor)")
                + ".",
            )
    numbers = {
        f"quantization/{k}": float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    }
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=trainer.global_step)
    cb._results = results
    cb._figures = {"int8_vs_fp32": str(folder / "int8_vs_fp32.png")}
    write_json(folder / "quantization.json", cb.report())
    save_figure(trainer, qat_figure(results), folder / "int8_vs_fp32.png", tag="quantization/int8_vs_fp32")
    return results


def qat_figure(r: dict[str, Any]) -> Any:
    """Bars of size, latency and accuracy, fp32 against int8."""
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
