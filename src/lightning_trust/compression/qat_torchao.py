"""torchao's ``quantize_`` QAT for Linear-heavy models (transformers): the backend
``QuantizationAwareTraining(backend="torchao")`` drives.

Fake quantization is a module swap (``quantize_(model, QATConfig(base, step="prepare"))``: every
``nn.Linear`` becomes torchao's ``FakeQuantizedLinear``, which keeps the same ``Parameter``
objects, so the optimizer, LR schedulers and checkpoints' keys are unchanged); at the end of fit a
copy is converted (``QATConfig(base, step="convert")``: int8 tensor-subclass weights) and exported
with ``torch.export`` (subclasses unwrapped to plain int8 tensors) to a ``.pt2`` that reloads in a fresh process
(:func:`~lightning_trust.compression.load_int8_model`).

Schemes (``torchao_scheme``):

* ``"int8"``: int8 dynamic per-token activations (asymmetric) and int8 per-channel weights
  (symmetric), converted with ``Int8DynamicActivationInt8WeightConfig``: real int8 matmuls
  (``aten._int_mm``), fast where the CPU has AVX512-VNNI or AMX.
* ``"int8_int4"``: int8 dynamic activations and int4 weights in groups of ``group_size``
  (``Int8DynamicActivationIntxWeightConfig``, unpacked to int8: the ExecuTorch layout; on x86
  the weights are dequantized for an fp32 matmul, so it is smaller, not faster).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> linear_mac_share(net, torch.ones(3, 4))
    1.0
    >>> torchao_prepare(net, "int8")
    ['0', '2']
    >>> type(net[0]).__name__, net(torch.ones(3, 4)).shape
    ('FakeQuantizedLinear', torch.Size([3, 2]))
    >>> type(float_reference(net)[0]).__name__  # a copy swapped back to nn.Linear, same weights
    'Linear'
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_trust.compression.qat_call import ForwardCall
from lightning_trust.compression.qat_graph import training_ops

__all__ = [
    "SCHEMES",
    "choose_backend",
    "cpu_capability",
    "float_reference",
    "is_prepared",
    "linear_mac_share",
    "torchao_configs",
    "torchao_convert",
    "torchao_prepare",
    "torchao_trial",
]

#: ``torchao_scheme`` -> what it quantizes
SCHEMES: dict[str, str] = {
    "int8": "torchao quantize_: int8 dynamic activations, int8 per-channel weights",
    "int8_int4": "torchao quantize_: int8 dynamic activations, int4 grouped weights",
}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: share of the MACs in ``nn.Linear`` from which ``backend="auto"`` picks torchao
LINEAR_SHARE_FOR_TORCHAO = 0.5


def torchao_configs(scheme: str, group_size: int = 32) -> tuple[Any, Any]:
    """The ``QATConfig`` of the prepare step and of the convert step of ``scheme``."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        MappingType,
        PerGroup,
    )
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if scheme == "int8":
        # torchao infers no fake quantization from this base config: the same numerics spelled out
        # (its per-token fake quantizer is asymmetric only, hence asymmetric activations on both sides)
        prepare = QATConfig(
            activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
            step="prepare",
        )
        base = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC, set_inductor_config=False)
        return prepare, QATConfig(base, step="convert")
    if scheme == "int8_int4":
        int4 = getattr(torch, "int4")  # noqa: B009  (absent from torch's type stubs)
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerGroup(group_size))
        return QATConfig(base, step="prepare"), QATConfig(base, step="convert")
    raise ValueError(f"`torchao_scheme` must be one of {sorted(SCHEMES)}, got {scheme!r}.")


def _layer_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> float:
    if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
        return output.numel() * module.in_features
    if isinstance(module, _CONVS) and isinstance(output, torch.Tensor):
        kernel = module.weight[0].numel()  # in_channels / groups * kernel size
        return output.numel() * kernel
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and isinstance(output, torch.Tensor):
        return output.numel() * weight.shape[0]  # transformers' Conv1D: a Linear with a transposed weight
    return 0.0


def linear_mac_share(model: nn.Module, example: Any) -> float:
    """The share of the MACs of one call (``example``: a :class:`ForwardCall` or a batch's inputs)
    spent in ``nn.Linear``, among Linear, Conv and transformers' Conv1D layers (0 without any)."""
    call = ForwardCall.from_inputs(model, example)
    macs = {"linear": 0.0, "other": 0.0}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        macs["linear" if isinstance(module, nn.Linear) else "other"] += _layer_macs(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    from lightning_trust.compression.export import plain_forward
    from lightning_trust.core.passes import fork_rngs

    try:
        with torch.no_grad(), fork_rngs(), plain_forward(model):
            call.invoke(model)
    finally:
        for handle in handles:
            handle.remove()
    total = macs["linear"] + macs["other"]
    return macs["linear"] / total if total else 0.0


def choose_backend(model: nn.Module, example: Any) -> tuple[str, float]:
    """``backend="auto"``: torchao when most MACs are in ``nn.Linear`` (transformers), else PT2E
    (conv nets, whose int8 convolutions only the PT2E X86 Inductor path fuses). Returns the backend
    and the measured Linear share."""
    share = linear_mac_share(model, example)
    return ("torchao" if share >= LINEAR_SHARE_FOR_TORCHAO else "pt2e"), share


def is_prepared(model: nn.Module) -> bool:
    """Whether torchao's fake-quantized layers are in ``model``."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def torchao_prepare(model: nn.Module, scheme: str, group_size: int = 32) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` for torchao's fake-quantized one, in place; returns their
    names. Raises naming the layer and the fix when nothing can be quantized or a layer's width does
    not fit the int4 groups."""
    from torchao.quantization import quantize_

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if not names:
        raise ValueError(
            f"QuantizationAwareTraining(backend='torchao') found no nn.Linear in {type(model).__name__}: torchao's "
            "quantize_ swaps nn.Linear layers. Use backend='pt2e' (convolutions) or leave this model out of QAT."
        )
    if scheme == "int8_int4":
        misfit = [n for n in names if _width(model, n) % group_size]
        if misfit:
            width = _width(model, misfit[0])
            raise ValueError(
                f"QuantizationAwareTraining(torchao_scheme='int8_int4', group_size={group_size}): layer "
                f"{misfit[0]!r} has in_features={width}, not a multiple of the group size. Set `group_size` to a "
                f"divisor of every Linear's width (e.g. 16 or 8), or use torchao_scheme='int8'."
            )
    prepare, _ = torchao_configs(scheme, group_size)
    quantize_(model, prepare, filter_fn=lambda m, *_: type(m) is nn.Linear)
    return names


def _width(model: nn.Module, name: str) -> int:
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear)
    return layer.in_features


def float_reference(model: nn.Module) -> nn.Module:
    """An eval-mode float copy of a torchao-prepared model, its layers swapped back to ``nn.Linear``."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from lightning_trust.compression.export import float_copy

    clone = float_copy(model).cpu().eval()
    if is_prepared(clone):
        quantize_(clone, QATConfig(step="convert"))  # without a base config: the module swap back alone
    return clone


def torchao_convert(model: nn.Module, scheme: str, example: Any, group_size: int = 32) -> tuple[nn.Module, Any]:
    """A real int8 copy of a torchao-prepared ``model`` (left untouched): converted in eval mode on
    CPU, and its ``torch.export`` program (dynamic batch). Raises naming the module when it cannot be
    exported, or when a training-mode operation is left in the program."""
    from torchao.quantization import quantize_

    from lightning_trust.compression.export import export_call, float_copy
    from lightning_trust.compression.export_refusal import export_refusal

    _, convert = torchao_configs(scheme, group_size)
    clone = float_copy(model).cpu().eval()
    with torch.no_grad():
        quantize_(clone, convert)
    from torchao.utils import unwrap_tensor_subclass

    try:  # exported with plain int8 tensors (the program's weights are what the file holds)
        with torch.no_grad():
            program = export_call(unwrap_tensor_subclass(copy.deepcopy(clone)), example)
    except Exception as err:
        raise export_refusal(clone, example, err) from err
    left = training_ops(program.graph_module) + list(program.graph_signature.buffers_to_mutate.values())
    if left:
        raise RuntimeError(
            f"The int8 program of {type(model).__name__} still has training-mode operations {left}: its outputs would "
            "not be deterministic. Remove them from the forward (dropout without `self.training`), or leave this "
            "model out of QAT."
        )
    return clone, program


def torchao_trial(model: nn.Module, example: Any, scheme: str, group_size: int = 32) -> None:
    """Before training: prepare, run, convert and export a CPU copy, so a model that cannot be
    served is refused now, naming the module and the fix."""
    from lightning_trust.compression.export import float_copy
    from lightning_trust.core.passes import fork_rngs

    clone = float_copy(model).cpu()
    torchao_prepare(clone, scheme, group_size)
    call = ForwardCall.from_inputs(clone, example)
    with torch.no_grad(), fork_rngs():
        call.invoke(copy.deepcopy(clone).eval())
    torchao_convert(clone, scheme, call, group_size)


def cpu_capability() -> str:
    """The vector ISA PyTorch's CPU kernels use here (``"AVX2"``, ``"AVX512"``, ...): int8 matmuls
    beat fp32 with AVX512-VNNI or AMX, not with AVX2 alone."""
    return str(torch.backends.cpu.get_cpu_capability())
