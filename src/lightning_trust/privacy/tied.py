"""Tied parameters: one trainable tensor held by several layers (GPT-2's ``lm_head`` and ``wte``).

Opacus's hooks mode counts a parameter's uses in the forward pass and sums the per-sample
gradients of every use before clipping, which is the per-sample gradient of the tied weight.
Ghost clipping computes one norm per layer use instead and cannot combine them, so a tied model
is refused in ghost mode before training (:func:`check_ghost_ties`); a module reused inside one
forward (the demo Transformer's embedding) is refused at its second call
(:class:`~lightning_trust.privacy.broadcast.BatchAlignment`).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    >>> model[1].weight = model[0].weight
    >>> tied_parameters(model)
    {'0.weight': ['0', '1']}
    >>> check_ghost_ties(model, "ghost")
    Traceback (most recent call last):
    ...
    ValueError: grad_sample_mode='ghost' cannot clip tied parameters (one weight used by several layers): 0.weight in layers 0, 1. Ghost clipping computes one gradient norm per layer, not the norm of the summed per-sample gradient of a shared weight. Use grad_sample_mode='hooks' (or 'functorch'), which sums the per-sample gradients of every use.
"""

from __future__ import annotations

from torch import nn

__all__ = ["check_ghost_ties", "tied_parameters"]


def tied_parameters(module: nn.Module) -> dict[str, list[str]]:
    """Trainable parameters held by more than one layer: ``{parameter name: [layer names]}``
    (the name is the one ``named_parameters`` gives; layers in module order)."""
    holders: dict[int, list[str]] = {}
    for layer_name, layer in module.named_modules(remove_duplicate=False):
        for p in layer.parameters(recurse=False):
            if p.requires_grad:
                holders.setdefault(id(p), []).append(layer_name)
    return {
        name: holders[id(p)]
        for name, p in module.named_parameters()
        if p.requires_grad and len(holders.get(id(p), [])) > 1
    }


def check_ghost_ties(module: nn.Module, grad_sample_mode: str) -> None:
    """Refuse ghost clipping on a module with tied parameters, naming them and the fix."""
    if grad_sample_mode != "ghost":
        return
    tied = tied_parameters(module)
    if tied:
        listing = "; ".join(f"{name} in layers {', '.join(layers)}" for name, layers in tied.items())
        raise ValueError(
            f"grad_sample_mode='ghost' cannot clip tied parameters (one weight used by several layers): {listing}. "
            "Ghost clipping computes one gradient norm per layer, not the norm of the summed per-sample gradient "
            "of a shared weight. Use grad_sample_mode='hooks' (or 'functorch'), which sums the per-sample "
            "gradients of every use."
        )
