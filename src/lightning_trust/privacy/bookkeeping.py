"""One-backward DP clipping (book-keeping, Bu et al., ICML 2023) on an unchanged module.

In a training forward every layer with trainable parameters keeps its inputs and, through a hook
on its output, the output gradient; its DP parameters do not require grad during its forward, so
the backward computes no parameter gradient at all, only the gradients flowing between layers.
After the one backward, the per-sample gradient norms (over every layer) come from the kept tensors
(:mod:`~lightning_trust.privacy.bk_rules`: ghost norms for Linear, Embedding, Conv, Hugging Face
``Conv1D``; Opacus's grad samplers or functorch otherwise), and ``p.grad`` is set to the clipped sum
``sum_i c_i g_i``, ``c_i = min(1, C / (||g_i|| + 1e-6))``, computed from the same tensors. Opacus's
``DPOptimizerFastGradientClipping`` then adds the noise and averages, as for ghost clipping.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> bk = BookKeeping(max_grad_norm=0.1)
    >>> bk.attach(model)
    >>> model(torch.randn(8, 3)).pow(2).mean().backward()  # one backward, no second pass
    >>> bk.finish()
    >>> bk.per_sample_norms.shape, model[0].weight.grad.shape
    (torch.Size([8]), torch.Size([4, 3]))
    >>> bool(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])) <= 8 * 0.1 + 1e-4)
    True
    >>> bk.detach()
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
from opacus.grad_sample.functorch import prepare_layer
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
from torch import Tensor, nn

from lightning_trust.privacy.bk_rules import ParamGrads, Part, contributions, has_rule
from lightning_trust.privacy.copies import SharedOnCopy

__all__ = ["BookKeeping", "choose_mode", "hooked_modules", "unsupported_layers"]

_RNN = (DPRNN, DPLSTM, DPGRU)


def _direct_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def hooked_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The layers that own the trainable parameters, as Opacus's hooks pick them: a layer with
    trainable parameters of its own; below one with no rule (functorch takes it whole) nothing more."""
    if _direct_trainable(module) and type(module) not in _RNN:
        yield prefix or type(module).__name__, module
        if not has_rule(module):
            return
    for name, child in module.named_children():
        yield from hooked_modules(child, f"{prefix}.{name}" if prefix else name)


def unsupported_layers(module: nn.Module) -> list[str]:
    """The hooked layers with neither a book-keeping rule nor an Opacus grad sampler (functorch)."""
    return [f"{name} ({type(m).__name__})" for name, m in hooked_modules(module) if not has_rule(m)]


def choose_mode(requested: str, module: nn.Module, clipping: str = "flat", accumulate: int = 1) -> tuple[str, str]:
    """The grad-sample mode to use and why: ``requested`` unless it is ``"auto"``, which picks
    ``"bk"`` (one backward) when flat clipping, no gradient accumulation and a rule (book-keeping or
    Opacus grad sampler) for every trainable layer allow it, else ``"hooks"``."""
    if requested != "auto":
        return requested, "requested"
    if clipping != "flat":
        return "hooks", f"clipping={clipping!r} needs per-sample gradients (bk and ghost clip the whole gradient)"
    if accumulate > 1:
        return "hooks", f"Trainer(accumulate_grad_batches={accumulate}) needs per-sample gradients kept across batches"
    missing = unsupported_layers(module)
    if missing:
        return "hooks", f"no book-keeping rule or Opacus grad sampler for {', '.join(missing[:3])}"
    return "bk", "every trainable layer has a book-keeping rule or an Opacus grad sampler (one backward pass)"


@dataclass
class _Call:
    name: str
    module: nn.Module
    activations: list[Any]
    grad: Optional[Tensor] = None
    disabled: list[nn.Parameter] = field(default_factory=list)  # requires_grad off during the forward
    params: list[nn.Parameter] = field(default_factory=list)  # the DP parameters this call uses
    grads: Optional[list[ParamGrads]] = None  # their norms, computed in the backward (single-use weights)


class BookKeeping(SharedOnCopy):
    """Per-sample clipping in one backward pass on a module's layers.

    ``dp_params`` gives the parameters that are clipped (the DP optimizer's; default: every
    trainable parameter). :meth:`backward` replaces ``loss.backward()`` (the module's ``backward``
    while attached); :meth:`finish` after a plain ``loss.backward()`` does the same.
    """

    def __init__(self, max_grad_norm: float = 1.0, dp_params: Optional[Callable[[], list[nn.Parameter]]] = None):
        self.max_grad_norm = max_grad_norm
        self.dp_params = dp_params
        self.module: Optional[nn.Module] = None
        self.per_sample_norms: Optional[Tensor] = None
        self._handles: list[Any] = []
        self._calls: list[_Call] = []
        self._open: dict[int, list[_Call]] = {}  # calls whose forward runs now, per module
        self._pause_depth = 0
        self._params: list[nn.Parameter] = []  # hooked parameters (structure check)
        self._prepared: list[nn.Module] = []
        self._own: dict[int, list[nn.Parameter]] = {}  # the parameters each hooked layer's forward uses
        self._wanted: Optional[set[int]] = None  # ids of the DP parameters, per batch
        self._uses: Optional[Counter[int]] = None  # calls per DP parameter in this batch's forward

    # ------------------------------------------------------------------ attach / detach
    def attach(self, module: nn.Module, override_backward: bool = False) -> None:
        """Hook ``module``'s layers (``override_backward``: its ``backward`` becomes :meth:`backward`)."""
        self.module = module
        for name, layer in hooked_modules(module):
            if any(True for _ in layer.buffers()):
                raise ValueError(
                    f"grad_sample_mode='bk' cannot clip {name} ({type(layer).__name__}): a trainable layer with "
                    "buffers (BatchNorm?) mixes samples. Set `fix_module=True` or use another layer."
                )
            if not has_rule(layer):
                prepare_layer(layer)
                self._prepared.append(layer)
            self._own[id(layer)] = list(layer.parameters(recurse=not has_rule(layer)))
            self._handles.append(layer.register_forward_pre_hook(partial(self._before_forward, name)))
            self._handles.append(layer.register_forward_hook(self._after_forward))
        if override_backward:
            vars(module)["backward"] = self.backward  # removed in detach
        self._params = list(module.parameters())

    def detach(self) -> None:
        """Remove every hook and trace; the module is the user's again."""
        self._reset()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._prepared:
            layer.__dict__.pop("ft_compute_sample_grad", None)
        self._prepared = []
        self._own = {}
        if self.module is not None:
            self.module.__dict__.pop("backward", None)
        self.module = None
        self._params = []

    def structure_changed(self, module: nn.Module) -> bool:
        """Whether ``module``'s parameters are no longer the hooked ones (structural pruning)."""
        current = list(module.parameters())
        return len(current) != len(self._params) or any(a is not b for a, b in zip(current, self._params))

    def _reset(self) -> None:
        for calls in self._open.values():
            for call in calls:
                self._enable(call)
        self._open = {}
        self._calls = []
        self._wanted = None
        self._uses = None

    def begin_batch(self) -> None:
        """Forget calls recorded before this training batch."""
        self._reset()

    @property
    def is_paused(self) -> bool:
        """Whether inside :meth:`paused`."""
        return self._pause_depth > 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, nothing is recorded and backward is plain; the DP parameters' ``.grad`` (the
        clipped sum, once computed) is put back on exit. Re-entrant."""
        saved = [(p, p.grad) for p in self._dp_params()] if self._pause_depth == 0 else []
        for p, _ in saved:
            p.grad = None
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            for p, grad in saved:
                p.grad = grad

    # ------------------------------------------------------------------ recording
    def _dp_params(self) -> list[nn.Parameter]:
        if self.dp_params is not None:
            return [p for p in self.dp_params() if p.requires_grad]
        return [p for p in self.module.parameters() if p.requires_grad] if self.module is not None else []

    def _recording(self, layer: nn.Module) -> bool:
        return self._pause_depth == 0 and layer.training and torch.is_grad_enabled()

    def _before_forward(self, name: str, layer: nn.Module, args: Any) -> None:
        if not self._recording(layer):
            return
        if self._wanted is None:
            self._wanted = {id(p) for p in self._dp_params()}
        wanted = self._wanted
        call = _Call(name, layer, [])
        # the backward then computes no gradient for these: their clipped sum is written after it
        call.disabled = [p for p in self._own[id(layer)] if p.requires_grad and id(p) in wanted]
        call.params = list(call.disabled)
        for p in call.disabled:
            p.requires_grad_(False)
        self._open.setdefault(id(layer), []).append(call)

    @staticmethod
    def _enable(call: _Call) -> None:
        for p in call.disabled:
            p.requires_grad_(True)
        call.disabled = []

    def _after_forward(self, layer: nn.Module, args: Any, output: Any) -> Any:
        open_calls = self._open.get(id(layer))
        if not open_calls:
            return None
        call = open_calls.pop()
        self._enable(call)
        # the inputs the layer ran on (after other pre-hooks, e.g. a broadcast index expanded to the batch)
        call.activations = [a.detach() if isinstance(a, Tensor) else a for a in args]
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(first, Tensor) or not first.is_floating_point():
            raise TypeError(
                f"grad_sample_mode='bk' needs {call.name} ({type(layer).__name__}) to return a tensor, "
                f"got {type(first).__name__}; use grad_sample_mode='hooks'."
            )
        # a fresh tensor (not a view) that requires grad: the backward reaches it even when nothing before it
        # needs a gradient, and its hook sees the gradient of the layer's output even if the model then
        # modifies the output in place (a hook on a view modified in place never fires)
        anchor = torch.zeros((), dtype=first.dtype, device=first.device, requires_grad=True)
        first = first + anchor
        replaced = first if isinstance(output, Tensor) else type(output)([first, *output[1:]])
        first.register_hook(partial(self._keep_grad, call))
        self._calls.append(call)
        return replaced

    def _keep_grad(self, call: _Call, grad: Tensor) -> None:
        call.grad = grad.detach()
        if self._uses is None:
            self._uses = Counter(id(p) for c in self._calls for p in c.params)
        if call.params and all(self._uses[id(p)] == 1 for p in call.params):
            # a weight no other call uses: its norm now, while the tensors are fresh in the cache
            with torch.no_grad():
                wanted = {id(p) for p in call.params}
                found = contributions(call.module, call.activations, call.grad, wanted)
                call.grads = [ParamGrads(p, [part]) for p, part in found]
                for g in call.grads:
                    g.norm2()

    # ------------------------------------------------------------------ the backward and the clipped sum
    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward()`` once, then :meth:`finish` (plain inside :meth:`paused`)."""
        if self._pause_depth:
            loss.backward(*args, **kwargs)
            return
        for p in self._dp_params():
            p.grad = None
        loss.backward(*args, **kwargs)
        self.finish()

    def _batch_size(self, calls: list[_Call]) -> int:
        batch = max(call.grad.shape[0] for call in calls if call.grad is not None)
        for call in calls:
            sizes = {call.grad.shape[0] if call.grad is not None else batch}
            sizes |= {a.shape[0] for a in call.activations[:1] if isinstance(a, Tensor) and a.dim()}
            if sizes != {batch}:
                raise ValueError(
                    f"grad_sample_mode='bk': layer {call.name} ({type(call.module).__name__}) has batch size "
                    f"{sorted(sizes)}, the batch has {batch}, so its per-sample gradients are not the samples'. An "
                    "input broadcast over the batch (Hugging Face's position_ids of shape (1, L)) must be expanded "
                    "to the batch: pass it with shape (B, L), or use grad_sample_mode='hooks'."
                )
        return batch

    def finish(self) -> None:
        """After the backward: per-sample norms, clipping coefficients, ``p.grad = sum_i c_i g_i``."""
        calls, self._calls = self._calls, []
        self._reset()
        params = self._dp_params()
        leaked = [p for p in params if p.grad is not None]
        if leaked and self.module is not None:
            names = {id(p): n for n, p in self.module.named_parameters()}
            listing = ", ".join(names.get(id(p), "?") for p in leaked[:5])
            raise RuntimeError(
                f"grad_sample_mode='bk': parameters {listing} got a gradient outside their layer's forward (used "
                "directly by another module), which per-sample clipping would miss; use grad_sample_mode='hooks'."
            )
        with_grad = [call for call in calls if call.grad is not None]
        if not with_grad or self._batch_size(with_grad) == 0:
            self.per_sample_norms = torch.zeros(0)
            for p in params:
                p.grad = torch.zeros_like(p)
            return
        batch = self._batch_size(with_grad)
        wanted = {id(p) for p in params}
        parts: dict[int, list[Part]] = {id(p): [] for p in params}
        grads: list[ParamGrads] = []
        with torch.no_grad():
            for call in with_grad:
                assert call.grad is not None
                if call.grads is not None:
                    grads += [g for g in call.grads if id(g.param) in wanted]
                    continue
                for param, part in contributions(call.module, call.activations, call.grad, wanted):
                    parts[id(param)].append(part)
            grads += [ParamGrads(p, parts[id(p)]) for p in params if parts[id(p)]]
            norm2 = torch.stack([g.norm2().to(torch.float32) for g in grads]).sum(0) if grads else None
            # the loss is a mean: the per-sample gradients are `batch` times those of its backward
            norms = norm2.sqrt() * batch if norm2 is not None else torch.zeros(batch)
            self.per_sample_norms = norms
            weights = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * batch
            done = set()
            for g in grads:
                g.param.grad = g.clipped(weights.to(g.param.device))
                done.add(id(g.param))
            for p in params:
                if id(p) not in done:
                    p.grad = torch.zeros_like(p)
