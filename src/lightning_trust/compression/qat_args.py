"""The arguments of :class:`~lightning_trust.compression.QuantizationAwareTraining`, checked before training.

Example:
    >>> check_arguments(0, None, None, None, 32, 1, backend="torchao", torchao_scheme="int4")
    Traceback (most recent call last):
    ...
    ValueError: `torchao_scheme` must be one of ['int8', 'int8_int4'], got 'int4'.
"""

from __future__ import annotations

from typing import Optional

from lightning_trust.compression.qat_torchao import SCHEMES

__all__ = ["BACKENDS", "check_arguments", "check_torchao_freezes"]

#: ``backend`` -> what it does
BACKENDS: dict[str, str] = {
    "pt2e": "torch.export + torchao PT2E (X86 Inductor quantizer): conv nets, static int8 activations",
    "torchao": "torchao quantize_ with QATConfig: Linear-heavy models (transformers), dynamic int8 activations",
    "auto": "torchao when most MACs are in nn.Linear, else pt2e (decided at setup on the first batch)",
}


def check_arguments(
    start_epoch: int,
    freeze_observers_epoch: Optional[int],
    freeze_bn_epoch: Optional[int],
    export_path: Optional[str],
    latency_batch_size: int,
    latency_threads: int,
    backend: str = "pt2e",
    torchao_scheme: str = "int8",
    group_size: int = 32,
) -> None:
    """Every argument of :class:`QuantizationAwareTraining` checked before training."""
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise ValueError(f"`start_epoch` must be an integer >= 0, got {start_epoch!r}.")
    for arg, value in (("freeze_observers_epoch", freeze_observers_epoch), ("freeze_bn_epoch", freeze_bn_epoch)):
        if value is not None and value < start_epoch:
            raise ValueError(
                f"`{arg}` ({value}) must be >= `start_epoch` ({start_epoch}): nothing is quantized before."
            )
    if export_path is not None and not str(export_path).endswith(".pt2"):
        raise ValueError(f"`export_path` must end with '.pt2' (a torch.export program), got {export_path!r}.")
    for arg, value in (("latency_batch_size", latency_batch_size), ("latency_threads", latency_threads),
                       ("group_size", group_size)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg}` must be a positive integer, got {value!r}. Set it to e.g. 32 / 1.")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {sorted(BACKENDS)}, got {backend!r}.")
    if torchao_scheme not in SCHEMES:
        raise ValueError(f"`torchao_scheme` must be one of {sorted(SCHEMES)}, got {torchao_scheme!r}.")
    if backend == "torchao":
        check_torchao_freezes(freeze_observers_epoch, freeze_bn_epoch)


def check_torchao_freezes(freeze_observers_epoch: Optional[int], freeze_bn_epoch: Optional[int]) -> None:
    """torchao's dynamic quantization has no observers to freeze and folds no BatchNorm."""
    for arg, value in (("freeze_observers_epoch", freeze_observers_epoch), ("freeze_bn_epoch", freeze_bn_epoch)):
        if value is not None:
            raise ValueError(
                f"`{arg}={value}` has no effect with backend='torchao': its activations are quantized dynamically "
                "(no observers) and BatchNorm is not folded. Remove `{arg}`, or set backend='pt2e'.".replace(
                    "{arg}", arg
                )
            )
