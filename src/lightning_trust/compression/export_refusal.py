"""Why a model cannot be exported, said with the module to fix: the deepest submodule whose own
``torch.export`` fails, and a fix for the usual cause.

Example:
    >>> import torch
    >>> class Gate(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x  # a Python branch on a tensor's value
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin, self.gate = torch.nn.Linear(2, 2), Gate()
    ...     def forward(self, x):
    ...         return self.gate(self.lin(x))
    >>> failing_module(Net(), torch.ones(3, 2))  # doctest: +SKIP
    'gate'
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_trust.compression.qat_call import ForwardCall

__all__ = ["export_refusal", "failing_module"]


def _plain(module: nn.Module) -> Any:
    from lightning_trust.compression.export import plain_forward

    return plain_forward(module)


def failing_module(model: nn.Module, example: Any) -> Optional[str]:
    """The deepest module torch.export cannot capture on its own (for a refusal naming it): from
    the root, descend into the first child (in call order) whose own export fails."""
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            captured.setdefault(name, (tuple(args), dict(kwargs)))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(recorder(name), with_kwargs=True))
    try:
        with torch.no_grad(), _plain(model):
            ForwardCall.from_inputs(model, example).invoke(model)
    except Exception:  # the failing forward is what is being diagnosed
        pass
    finally:
        for h in handles:
            h.remove()

    def fails(name: str) -> bool:
        args, kwargs = captured[name]
        try:
            torch.export.export(model.get_submodule(name), args, kwargs)
        except Exception:  # any export failure counts
            return True
        return False

    culprit: Optional[str] = None
    children = [name for name in captured if "." not in name]
    while children:
        failing = next((name for name in children if fails(name)), None)
        if failing is None:
            break
        culprit = failing
        children = [n for n in captured if n.startswith(failing + ".") and "." not in n[len(failing) + 1 :]]
    return culprit


def export_refusal(model: nn.Module, example: Any, err: BaseException) -> RuntimeError:
    """The refusal of a model torch.export cannot capture: the deepest failing module and the fix."""
    culprit = failing_module(model, example)
    kind = type(model.get_submodule(culprit)).__name__ if culprit else ""
    where = f"its module {culprit!r} ({kind})" if culprit else "its forward"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "data-dependent" in str(err) or "GuardOnDataDependent" in type(err).__name__:
        fix = (
            "Remove the branch on tensor values there"
            + (" (pass `tgt_is_causal=True`/`is_causal=True` with the attention masks: nn.Transformer compares a "
               "mask's values with a causal mask at run time)" if kind.startswith("Transformer") else "")
            + ", or leave this model out of QAT."
        )  # fmt: skip
    else:
        fix = "Make that code exportable (no Python branches on tensor values, no unsupported outputs), or leave this model out of QAT."
    return RuntimeError(
        f"QuantizationAwareTraining cannot quantize {type(model).__name__}: torch.export failed in {where}: "
        f"{type(err).__name__}: {first[:300]}. {fix}"
    )
