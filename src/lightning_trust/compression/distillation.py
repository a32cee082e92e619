"""Knowledge distillation during the recovery epochs of :class:`~lightning_trust.compression.ProgressivePruning`:
the model as it was before the first pruning step (a frozen copy) is the teacher, and the loss the
user's ``training_step`` returns becomes ``(1 - weight) * loss + weight * T^2 * KL(teacher_T || student_T)``
(Hinton et al. 2015: logits softened at temperature ``T``; ``T^2`` keeps the gradient's scale).

The user's module is not changed: its ``training_step`` is wrapped by an instance attribute (removed
in ``teardown``), as :class:`~lightning_trust.fairness.FairnessPenalty` adds its term. The student's
logits are those of the forward the step ran (a forward hook), else one extra forward; the teacher
runs under ``no_grad`` in eval mode on the same inputs. The teacher's weights travel in the
pruning callback's checkpoint state, so a killed and resumed recovery distills from the same teacher.

Example:
    >>> import torch
    >>> student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    >>> round(distillation_loss(student, teacher, temperature=1.0).item(), 4)
    0.4621
    >>> Distillation(temperature=0.0)
    Traceback (most recent call last):
    ...
    ValueError: `temperature` must be a positive number, got 0.0.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_trust.core.batch import BatchContract, batch_size_of, call_module, logits_of
from lightning_trust.core.capture import ForwardCapture

__all__ = ["Distillation", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the rows (every
    position of token-level logits is a row)."""
    classes = student.shape[-1]
    log_p = F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1)
    log_q = F.log_softmax(teacher.reshape(-1, classes).to(student.dtype) / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


@dataclass
class Distillation:
    """Distill the dense model into the pruned one during recovery (``ProgressivePruning(distill=...)``).

    Args:
        temperature: the softmax temperature ``T`` of both logits (> 0).
        weight: the share of the distillation term in the loss, in (0, 1]: ``(1 - weight) * loss + weight * kd``.
    """

    temperature: float = 2.0
    weight: float = 0.5
    steps: int = 0
    teacher: Optional[nn.Module] = field(default=None, repr=False)
    _patched: Optional[nn.Module] = field(default=None, repr=False)
    _contract: Optional[BatchContract] = field(default=None, repr=False)
    _last: Optional[float] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        t, w = self.temperature, self.weight
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
            raise ValueError(f"`temperature` must be a positive number, got {t!r}.")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ValueError(f"`weight` must be in (0, 1] (the distillation share of the loss), got {w!r}.")

    def keep_teacher(self, module: nn.Module) -> None:
        """Freeze a copy of ``module`` (called once, before the first pruning step) as the teacher."""
        if self.teacher is not None:
            return
        teacher = copy.deepcopy(module)
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the teacher's weights (its structure is the dense model's), the
        distilled steps and the last loss, so a resumed recovery distills from the same teacher."""
        teacher = self.teacher
        weights = None if teacher is None else {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        return {"teacher": weights, "steps": self.steps, "last_loss": self._last}

    def restore(self, state: Optional[Mapping[str, Any]], dense: Optional[nn.Module]) -> None:
        """Rebuild the teacher of a checkpoint's :meth:`state_dict` on a copy of ``dense`` (the module
        before pruning: a freshly built model), before the module is brought to the pruned structure."""
        if not state:
            return
        self.steps, self._last = int(state.get("steps", 0)), state.get("last_loss")
        if state.get("teacher") is None:
            self.teacher = None
            return
        if dense is None:
            raise RuntimeError(
                "ProgressivePruning(distill=...) cannot rebuild the dense teacher of this checkpoint: the module is "
                "already pruned and its dense structure is unknown. Resume with a freshly built model."
            )
        self.teacher = None
        self.keep_teacher(dense)
        assert self.teacher is not None
        self.teacher.load_state_dict(state["teacher"])  # strict: the dense shapes

    def patch(self, module: Any, contract: Optional[BatchContract]) -> None:
        """Wrap ``module.training_step`` so its loss gets the distillation term once a teacher is kept."""
        if self._patched is module:
            return
        if not getattr(module, "automatic_optimization", True):
            raise RuntimeError(
                "ProgressivePruning(distill=...) adds its term to the loss training_step returns, which manual "
                "optimization does not backpropagate. Add `distillation_loss(student, teacher, T)` to your own "
                "loss instead, or set `distill: null`."
            )
        original, owner = module.training_step, self
        self._contract = contract

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if owner.teacher is None:
                return original(*args, **kwargs)
            return owner._distilled_step(module, original, args, kwargs)

        module.training_step = training_step
        self._patched = module

    def unpatch(self) -> None:
        if self._patched is not None:
            self._patched.__dict__.pop("training_step", None)
            self._patched = None

    def _distilled_step(self, module: Any, original: Any, args: Any, kwargs: Any) -> Any:
        assert self._contract is not None and self.teacher is not None
        batch = args[0] if args else kwargs["batch"]
        capture = ForwardCapture(detach=False)
        capture.arm(module, batch_size_of(batch, self._contract))
        try:
            out = original(*args, **kwargs)
        finally:
            student = capture.disarm()
        if out is None:
            return out  # the user skipped this batch
        inputs = self._contract.inputs(batch)
        if student is None or not student.requires_grad:
            student = logits_of(call_module(module, inputs))
        with torch.no_grad():
            self.teacher.to(student.device).eval()
            teacher = logits_of(call_module(self.teacher, inputs))
        kd = distillation_loss(student, teacher, float(self.temperature))
        self.steps += 1
        self._last = float(kd.detach())
        module.log("compression/distillation_loss", kd.detach(), on_step=False, on_epoch=True)
        w = float(self.weight)
        if isinstance(out, Tensor):
            return (1.0 - w) * out + w * kd
        if isinstance(out, Mapping) and "loss" in out:
            return {**out, "loss": (1.0 - w) * out["loss"] + w * kd}
        raise TypeError(
            f"ProgressivePruning(distill=...) cannot add its term to a training_step output of type "
            f"{type(out).__name__}; return the loss tensor or a dict with 'loss'."
        )

    def summary(self) -> dict[str, Any]:
        """For the report: the settings, the distilled steps and the last distillation loss."""
        return {"temperature": self.temperature, "weight": self.weight, "steps": self.steps, "last_loss": self._last}
