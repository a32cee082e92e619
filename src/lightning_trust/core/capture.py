"""Reusing the forward the user's step already ran, instead of running another.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> capture = ForwardCapture()
    >>> capture.arm(model, size=4)
    >>> _ = model(torch.ones(4, 3))
    >>> capture.disarm().shape
    torch.Size([4, 2])
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_trust.core.batch import BatchContract, batch_size_of, logits_or_none, predictions_from_outputs
from lightning_trust.core.passes import isolated_eval

__all__ = ["ForwardCapture", "step_predictions"]


class ForwardCapture:
    """While armed, keeps the first output of ``module(...)`` whose scores have the batch's leading
    size (a tensor, a ``ModelOutput``'s ``.logits``, a dict's logits), and the call's inputs.

    ``detach=False`` keeps the output on the autograd graph (a loss term that backpropagates
    through the forward the user's step ran).
    """

    def __init__(self, detach: bool = True) -> None:
        self.detach = detach
        self.output: Optional[Tensor] = None
        self.inputs: Any = None
        self._size: Optional[int] = None
        self._handle: Any = None

    def arm(self, module: nn.Module, size: Optional[int]) -> None:
        """Listen to ``module``'s next forward calls; ``size=None`` (unknown batch size) listens to none."""
        self.disarm()
        self.output, self.inputs, self._size = None, None, size
        if size is not None:
            self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        # a torch.export trace of the module (QAT prepares inside the step) is no prediction, and comparing
        # its symbolic batch size would pin the dynamic batch dimension
        if self.output is not None or torch.compiler.is_exporting():
            return
        scores = logits_or_none(output)
        if isinstance(scores, Tensor) and scores.ndim >= 1 and scores.shape[0] == self._size:
            self.output = scores.detach() if self.detach else scores
            self.inputs = kwargs if kwargs and not args else (args[0] if args else None)

    def disarm(self) -> Optional[Tensor]:
        """Stop listening; the captured output (or ``None``)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        output, self.output = self.output, None
        return output


def step_predictions(
    capture: ForwardCapture, contract: BatchContract, module: nn.Module, batch: Any, outputs: Any, trainer: Any = None
) -> Tensor:
    """The step's predictions: from its outputs, else its own captured forward, else one isolated forward."""
    captured = capture.disarm()
    preds = predictions_from_outputs(outputs, batch_size_of(batch, contract))
    if preds is None and captured is not None:
        preds = captured
    if preds is None:
        with isolated_eval(module, trainer) as isolated:
            preds = contract.predictions(isolated, batch)
    return preds
