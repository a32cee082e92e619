"""What travels between a client and the server: the *payload* of a module's state dict.

``payload="trainable"`` (the default) sends the parameters that train (``requires_grad``: LoRA
adapters, PEFT ``modules_to_save`` heads, a fine-tuned head) and the buffers; the frozen
parameters (a pretrained base) never leave a client, and the server neither receives nor holds
them. A module without frozen parameters sends everything either way. ``payload="full"`` also
sends the frozen parameters (the whole model, as plain FedAvg does).

A tensor shared under two names (tied embeddings: GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) travels once, under its first name. Since the frozen base is not
sent, every client must hold the same one; :func:`base_fingerprint` (a SHA-256 of the frozen
tensors' bytes) lets the simulation check that it stays unchanged and the Flower client that it
equals the server's.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> _ = model[0].requires_grad_(False)  # a frozen base, a trainable head
    >>> payload_keys(model, "trainable"), payload_keys(model, "full")
    (['1.weight', '1.bias'], ['0.weight', '0.bias', '1.weight', '1.bias'])
    >>> frozen_bytes(model), payload_bytes(payload_state(model, payload_keys(model, "trainable")))
    (80, 40)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from lightning_trust.core.tensors import tensor_bytes
from lightning_trust.federated.server import matches_any

__all__ = [
    "PAYLOADS",
    "Payload",
    "base_fingerprint",
    "check_base_unchanged",
    "check_fingerprint",
    "check_payload",
    "frozen_bytes",
    "frozen_names",
    "load_payload",
    "payload_bytes",
    "payload_keys",
    "payload_state",
    "select_payload",
    "trainable_names",
]

Payload = Literal["trainable", "full"]
PAYLOADS: tuple[str, ...] = ("trainable", "full")
State = dict[str, Tensor]


def check_payload(payload: object) -> Payload:
    """``payload`` if it is ``"trainable"`` or ``"full"``, else a ValueError naming the choices."""
    if payload not in PAYLOADS:
        raise ValueError(
            f"`payload` must be 'trainable' (only parameters with requires_grad and buffers travel; the frozen base "
            f"stays on the clients) or 'full' (the whole model travels), got {payload!r}."
        )
    return payload  # type: ignore[return-value]


def frozen_names(module: nn.Module) -> list[str]:
    """Names of the module's parameters that do not train (``requires_grad=False``)."""
    return [n for n, p in module.named_parameters() if not p.requires_grad]


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the module's parameters that train."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def payload_keys(module: nn.Module, payload: Payload) -> list[str]:
    """The state-dict keys that travel, in state-dict order, each distinct tensor once."""
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}
    keys, seen = [], set()
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) in seen:  # a tied alias: the tensor already travels under its first name
            continue
        seen.add(id(value))
        if payload == "trainable" and id(value) in frozen:
            continue
        keys.append(key)
    return keys


def payload_state(module: nn.Module, keys: Iterable[str]) -> State:
    """Detached CPU copies of the module's ``keys`` (what a client sends)."""
    state = module.state_dict()
    return {k: state[k].detach().clone().cpu() for k in keys}


def payload_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors of a payload, as they travel (their own dtypes)."""
    return tensor_bytes(dict(state))


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of the frozen parameters (what ``payload="trainable"`` keeps on the clients)."""
    return tensor_bytes([p for p in module.parameters() if not p.requires_grad])


def load_payload(module: nn.Module, state: Mapping[str, Tensor], required: Iterable[str] = ()) -> None:
    """Load a received payload into ``module`` (the rest of its state stays as it is).

    Refuses keys the module lacks, and a payload without one of the ``required`` keys (a
    parameter that trains here but would never be aggregated).
    """
    own = module.state_dict(keep_vars=True)
    unknown = [k for k in state if k not in own]
    if unknown:
        raise KeyError(f"The received weights name {unknown[:5]} which the module lacks; build the same module on "
                       "the server and the clients.")  # fmt: skip
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"The received weights lack the trainable parameters {missing[:5]}: they would train here but never be "
            "aggregated. Send them (`payload='trainable'` sends every parameter with requires_grad) or freeze them."
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype).reshape(own[k].shape))


def base_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) of the frozen parameters' names, dtypes, shapes and bytes; ``""`` when none are frozen."""
    digest = hashlib.sha256()
    found = False
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        found = True
        t = p.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest() if found else ""


def select_payload(
    module: nn.Module, payload: Payload, keep_local: Sequence[str], server_state: Optional[State]
) -> tuple[list[str], set[str], dict[str, int]]:
    """A round's ``(keys that travel, their parameter names, sizes)``; a tensor that became trainable
    (a layer unfrozen) joins ``server_state`` from the base every party holds."""
    keys = payload_keys(module, payload)
    if server_state is not None:
        server_state.update(payload_state(module, [k for k in keys if k not in server_state]))
    state = module.state_dict()
    sent = [k for k in keys if not matches_any(k, keep_local)]
    info = {
        "tensors": len(sent),
        "bytes": payload_bytes({k: state[k] for k in sent}),
        "frozen_bytes": frozen_bytes(module) if payload == "trainable" else 0,
    }
    return keys, {n for n, _ in module.named_parameters()} & set(keys), info


def check_base_unchanged(module: nn.Module, fingerprint: str) -> None:
    """Refuse a frozen base that changed since ``fingerprint`` (``""``: nothing to check)."""
    if fingerprint and base_fingerprint(module) != fingerprint:
        raise RuntimeError(
            "A frozen parameter (requires_grad=False) changed during the round, but with payload='trainable' frozen "
            "parameters never travel, so the change would not reach the other clients. Keep the base frozen (no "
            "in-place edits), or set `payload='full'` to federate every tensor."
        )


def check_fingerprint(module: nn.Module, expected: str) -> None:
    """Refuse to train on a frozen base other than the server's (``expected``: ``""`` checks nothing)."""
    if expected and base_fingerprint(module) != expected:
        raise ValueError(
            "This node's frozen parameters differ from the server's (base fingerprint "
            f"{base_fingerprint(module)[:12]} vs {expected[:12]}): with payload='trainable' the base never travels, so "
            "every node must build it identically. Seed `module_fn` or load the same pretrained weights in it, or "
            "use `server_app(..., payload='full')`."
        )
