"""Per-sample gradients on an unchanged module: Opacus's ``GradSampleHooks`` attached, detached,
paused for extra passes, re-attached after a structural change, the ghost-clipping backward, and
the one-backward book-keeping mode (:mod:`~lightning_trust.privacy.bookkeeping`).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> grads = PerSampleGradients("hooks")
    >>> grads.attach(model)
    >>> model(torch.randn(5, 3)).sum().backward()
    >>> tuple(model[0].weight.grad_sample.shape)
    (5, 2, 3)
    >>> grads.detach()
    >>> hasattr(model[0].weight, "grad_sample"), grads.attached
    (False, False)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from lightning_trust.core import iter_tensors
from lightning_trust.privacy.bookkeeping import BookKeeping, choose_mode
from lightning_trust.privacy.causal import replace_attention
from lightning_trust.privacy.copies import SharedOnCopy

__all__ = [
    "GRAD_SAMPLE_MODES",
    "GhostClippingHooks",
    "PerSampleGradients",
    "SafeGradSampleHooks",
    "check_module",
]

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "bk", "auto")
# per-parameter / per-module state Opacus keeps between a forward and the optimizer step
PARAM_ATTRS = ("grad_sample", "_current_grad_sample", "_forward_counter", "_norm_sample", "summed_grad")
MODULE_ATTRS = ("activations", "max_batch_len")
_MISSING = object()


class SafeGradSampleHooks(SharedOnCopy, GradSampleHooks):
    """Opacus's hooks, except that a backward pass with no recorded forward (eval mode, grads on, as in
    an attribution run outside :meth:`PerSampleGradients.paused`) is ignored instead of failing."""

    def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if not getattr(module, "activations", None):
            return
        super().capture_backprops_hook(module, *args, **kwargs)


class GhostClippingHooks(SharedOnCopy, GradSampleHooksFastGradientClipping):
    """Opacus's fast-gradient-clipping hooks with the same guard as :class:`SafeGradSampleHooks`."""

    def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if not getattr(module, "activations", None):
            return
        super().capture_backprops_hook(module, *args, **kwargs)


def _module_errors(module: nn.Module) -> list[Exception]:
    return [e for e in ModuleValidator.validate(module, strict=False) if "training mode" not in str(e)]


def _fix_in_place(pl_module: nn.Module) -> None:
    """Opacus's ``ModuleValidator`` fixers applied where the layers are (``ModuleValidator.fix``
    clones the module first, which would untie weights shared across children)."""
    for name, layer in list(trainable_modules(pl_module)):
        fixer = ModuleValidator.FIXERS.get(type(layer))
        if fixer is not None and name:
            parent_name, _, attr = name.rpartition(".")
            parent = pl_module.get_submodule(parent_name) if parent_name else pl_module
            setattr(parent, attr, fixer(layer).to(next(layer.parameters()).device))


def check_module(pl_module: nn.Module, fix_module: bool) -> None:
    """Refuse layers that break per-sample gradients (BatchNorm...), listing them; with
    ``fix_module`` replace them first (before the optimizer is built from the parameters):
    ``nn.MultiheadAttention`` with :class:`~lightning_trust.privacy.causal.CausalDPMultiheadAttention`
    (causal and other masks, weights copied), the rest with Opacus's ``ModuleValidator`` fixes."""
    errors = _module_errors(pl_module)
    if errors and fix_module:
        replace_attention(pl_module)
        _fix_in_place(pl_module)
        errors = _module_errors(pl_module)
        rank_zero_info("DifferentialPrivacy: replaced DP-incompatible layers with DP-compatible equivalents.")
    if errors:
        listing = "\n".join(f"  - {e}" for e in errors)
        raise ValueError(
            f"{type(pl_module).__name__} has layers that break per-sample gradients (DP-SGD):\n{listing}\n"
            "Set `DifferentialPrivacy(fix_module=True)` to replace them (BatchNorm -> GroupNorm, "
            "MultiheadAttention -> a DP equivalent with the same outputs, ...) before the optimizer is built, "
            "or change the model."
        )


def _same_objects(first: list[Any], second: list[Any]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


class PerSampleGradients(SharedOnCopy):
    """Opacus's per-sample-gradient hooks on a module, without wrapping it.

    ``mode``: ``"hooks"`` (Opacus's per-layer grad samplers), ``"functorch"``, ``"ghost"`` (fast
    gradient clipping: the hooks compute per-sample norms only, and the module's ``backward`` is
    replaced by a second, clipped backward), ``"bk"`` (book-keeping: one backward, then the clipped
    sum from the kept activations and output gradients) or ``"auto"`` (resolved at :meth:`attach`
    by :func:`~lightning_trust.privacy.bookkeeping.choose_mode` unless :meth:`set_mode` came first).
    ``optimizer_params`` gives the parameters whose ``.grad`` the ghost and bk backwards set (the DP
    optimizer's).
    """

    def __init__(
        self,
        mode: str = "hooks",
        max_grad_norm: float = 1.0,
        optimizer_params: Optional[Callable[[], list[nn.Parameter]]] = None,
    ) -> None:
        if mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got {mode!r}.")
        self.mode = mode
        self.max_grad_norm = max_grad_norm
        self.optimizer_params = optimizer_params
        self.hooks: Optional[GradSampleHooks] = None
        self.module: Optional[nn.Module] = None
        self._hooked_params: list[nn.Parameter] = []
        self._pause_depth = 0
        self._ghost_outputs: list[Tensor] = []
        self._ghost_handle: Any = None
        self.bk: Optional[BookKeeping] = None

    @property
    def attached(self) -> bool:
        """Whether hooks are on a module now."""
        return self.hooks is not None or self.bk is not None

    @property
    def recording(self) -> bool:
        """Whether a training forward now records per-sample state (hooks on and enabled, not paused)."""
        if self.bk is not None:
            return not self.bk.is_paused
        return self.hooks is not None and bool(self.hooks.hooks_enabled)

    def set_mode(self, mode: str) -> None:
        """Resolve ``"auto"`` (or change the mode) before :meth:`attach`."""
        if mode not in GRAD_SAMPLE_MODES or mode == "auto":
            raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES[:-1]}, got {mode!r}.")
        if self.attached:
            raise RuntimeError("The grad-sample mode cannot change while hooks are attached; detach first.")
        self.mode = mode

    # ------------------------------------------------------------------ attach / detach
    def attach(self, module: nn.Module) -> None:
        """Hook ``module`` (a no-op when hooks are attached already)."""
        if self.attached:
            return
        if self.mode == "auto":
            self.mode = choose_mode("auto", module)[0]
        self.module = module
        if self.mode == "bk":
            self.bk = BookKeeping(self.max_grad_norm, self.optimizer_params)
            try:
                self.bk.attach(module, override_backward=True)
            except ValueError:
                self.bk.detach()
                self.bk = None
                raise
            self._hooked_params = list(module.parameters())
            return
        common = {"batch_first": True, "loss_reduction": "mean", "strict": True}
        # torch warns when a hooked first layer gets an input without grad; that is the normal case here
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        try:
            if self.mode == "ghost":
                self.hooks = GhostClippingHooks(
                    module, max_grad_norm=self.max_grad_norm, use_ghost_clipping=True, **common
                )
                if self._ghost_handle is None:
                    self._ghost_handle = module.register_forward_hook(self._capture_output)
                    vars(module)["backward"] = partial(self._ghost_backward, module)  # removed in detach
            else:
                self.hooks = SafeGradSampleHooks(module, force_functorch=self.mode == "functorch", **common)
        except (NotImplementedError, ValueError) as err:
            raise ValueError(f"Opacus cannot compute per-sample gradients of {type(module).__name__}: {err}") from err
        self._hooked_params = list(module.parameters())

    def _remove_hooks(self) -> None:
        if self.bk is not None:
            self.bk.detach()
            self.bk = None
            self._hooked_params = []
            return
        if self.hooks is None or self.module is None:
            return
        self.hooks.cleanup()
        for m in self.module.modules():
            for name in MODULE_ATTRS:
                if name in m.__dict__:
                    delattr(m, name)
        for p in list(self.module.parameters()) + self._hooked_params:
            for name in PARAM_ATTRS:
                if name in p.__dict__:
                    delattr(p, name)
        self.hooks = None
        self._hooked_params = []

    def detach(self) -> None:
        """Remove every hook and every trace of per-sample state; the module is the user's again."""
        self._remove_hooks()
        if self._ghost_handle is not None and self.module is not None:
            self._ghost_handle.remove()
            self.module.__dict__.pop("backward", None)
        self._ghost_handle = None
        self._ghost_outputs = []
        self.module = None

    def structure_changed(self, module: nn.Module) -> bool:
        """Whether ``module``'s parameters are no longer the ones the hooks were attached to."""
        return self.attached and not _same_objects(self._hooked_params, list(module.parameters()))

    def reattach(self, module: nn.Module) -> None:
        """The module's parameters were replaced (structural pruning): hook the new structure
        (Opacus's strict validation runs on it again)."""
        self._remove_hooks()
        self.attach(module)

    def set_max_grad_norm(self, max_grad_norm: float) -> None:
        """The clipping bound the ghost hooks clip to (the DP optimizer's)."""
        self.max_grad_norm = max_grad_norm
        if self.bk is not None:
            self.bk.max_grad_norm = max_grad_norm
        if isinstance(self.hooks, GradSampleHooksFastGradientClipping):
            self.hooks.max_grad_norm = max_grad_norm

    def begin_batch(self) -> None:
        """Forget module outputs (bk: layer calls) recorded before this training batch."""
        self._ghost_outputs = []
        if self.bk is not None:
            self.bk.begin_batch()

    # ------------------------------------------------------------------ pause
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, the hooks record nothing, and the per-sample state (``grad_sample``,
        ``_current_grad_sample``, ``_norm_sample``, ``summed_grad``, activations, the ghost outputs)
        is restored on exit (bk: the DP parameters' ``.grad``, the clipped sum). Re-entrant; a no-op
        when nothing is attached."""
        if self.bk is not None:
            with self.bk.paused():
                yield
            return
        hooks, module = self.hooks, self.module
        if hooks is None or module is None or self._pause_depth > 0:
            self._pause_depth += 1
            try:
                yield
            finally:
                self._pause_depth -= 1
            return
        was_enabled = hooks.hooks_enabled
        saved_params = [(p, {a: getattr(p, a, _MISSING) for a in PARAM_ATTRS}) for p in module.parameters()]
        saved_modules = []
        for m in module.modules():
            state = {a: getattr(m, a, _MISSING) for a in MODULE_ATTRS}
            if isinstance(state["activations"], list):
                state["activations"] = list(state["activations"])
            saved_modules.append((m, state))
        saved_outputs = list(self._ghost_outputs)
        self._pause_depth += 1
        hooks.disable_hooks()
        try:
            yield
        finally:
            self._pause_depth -= 1
            for obj, values in saved_params + saved_modules:
                for name, value in values.items():
                    if value is _MISSING:
                        if name in obj.__dict__:
                            delattr(obj, name)
                    else:
                        setattr(obj, name, value)
            self._ghost_outputs = saved_outputs
            if was_enabled:
                hooks.enable_hooks()

    # ------------------------------------------------------------------ ghost clipping
    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._pause_depth or not module.training or not torch.is_grad_enabled():
            return
        # dim >= 1: under DDP Lightning routes training_step itself through the module's __call__, and its
        # scalar loss must not count as a model output; each tensor once
        seen = {id(t) for t in self._ghost_outputs}
        for tensor in iter_tensors(output):
            if tensor.is_floating_point() and tensor.requires_grad and tensor.dim() >= 1 and id(tensor) not in seen:
                self._ghost_outputs.append(tensor)
                seen.add(id(tensor))

    def _ghost_backward(self, module: nn.Module, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Two backward passes: per-sample norms first, then the gradient of the clipped loss
        ``sum_i c_i L_i``, injected at the module's outputs."""
        outputs, self._ghost_outputs = self._ghost_outputs, []
        if self._pause_depth or self.hooks is None:
            loss.backward(*args, **kwargs)
            return
        if not outputs:
            raise RuntimeError(
                "grad_sample_mode='ghost' needs the loss to be computed from the module's own output in "
                "training_step (`logits = self(x)`); none was recorded. Use grad_sample_mode='hooks'."
            )
        grads: list[Optional[Tensor]] = [None] * len(outputs)

        def keep(index: int, grad: Tensor) -> None:
            grads[index] = grad

        handles = [out.register_hook(partial(keep, i)) for i, out in enumerate(outputs)]
        try:
            loss.backward(retain_graph=True)  # first pass: the hooks compute per-sample gradient norms
        finally:
            for handle in handles:
                handle.remove()
        for p in self.optimizer_params() if self.optimizer_params is not None else module.parameters():
            p.grad = None
        coeff = self.hooks.get_clipping_coef()
        batch = coeff.shape[0]
        pairs = []
        for out, grad in zip(outputs, grads):
            if grad is None:
                continue
            if grad.shape[0] != batch:
                raise RuntimeError(
                    f"grad_sample_mode='ghost': a module output has batch size {grad.shape[0]}, the batch {batch}."
                )
            # d(sum_i c_i L_i)/dz_i = c_i * n * d(mean_i L_i)/dz_i
            scale = (coeff * batch).to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
            pairs.append((out, grad * scale))
        self.hooks.disable_hooks()
        try:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        finally:
            self.hooks.enable_hooks()
