"""Attention heads for :class:`~lightning_trust.compression.ProgressivePruning`: finding the modules
that expose their heads, what torch-pruning needs to remove whole heads (``num_heads``, the root
parameters of the embeddings), and keeping each module's attributes and the model's config equal
to the pruned shapes after every step.

A Hugging Face attention module keeps its head count and head size as attributes
(``num_attention_heads``, ``attention_head_size`` or ``head_dim``, ``all_head_size``) and reshapes
``q``/``k``/``v`` with ``-1`` heads: if only the projections shrank, the model would silently run
with other heads. Its config has one ``hidden_size``, ``num_attention_heads`` and
``intermediate_size`` for every layer, and ``hidden_size = heads * head_size``: so whole heads are
removed, the residual stream (``hidden_size``) keeps ``heads * head_size`` channels, the same in
every layer, and the MLP width (``intermediate_size``) is pruned by the schedule's ratio.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                             intermediate_size=16))
    >>> [(a.name, a.heads, a.head_size) for a in find_attention(bert)]
    [('encoder.layer.0.attention.self', 2, 4)]
    >>> hidden_ratio(heads_kept=1, heads=2, head_size=4)
    0.4375
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

__all__ = [
    "HEAD_ATTRS",
    "HEAD_SIZE_ATTRS",
    "AttentionModule",
    "Heads",
    "find_attention",
    "find_configs",
    "find_heads",
    "group_kind",
    "head_ratio",
    "hidden_ratio",
    "mlp_layers",
    "model_shapes",
    "num_heads_of",
    "root_parameters",
    "sync_attention",
]

#: attributes holding an attention module's head count (Hugging Face, timm)
HEAD_ATTRS: tuple[str, ...] = ("num_attention_heads", "num_heads")
#: attributes holding its head size
HEAD_SIZE_ATTRS: tuple[str, ...] = ("attention_head_size", "head_dim", "head_size")


@dataclass
class AttentionModule:
    """One attention module that exposes its heads: its projections and the attributes to keep in sync."""

    name: str
    module: nn.Module
    projections: list[nn.Linear]  # q, k, v (one fused qkv layer for timm-style attention)
    heads_attr: str
    size_attr: str
    head_size: int

    @property
    def heads(self) -> int:
        return int(getattr(self.module, self.heads_attr))

    @property
    def fused(self) -> bool:
        return len(self.projections) == 1

    def measured_heads(self) -> int:
        """The head count the projections' shapes hold now (the head size is kept)."""
        width = self.projections[0].out_features // (3 if self.fused else 1)
        return width // self.head_size


def _int_attr(module: nn.Module, names: Iterable[str]) -> Optional[str]:
    return next((n for n in names if isinstance(getattr(module, n, None), int)), None)


def find_attention(model: nn.Module) -> list[AttentionModule]:
    """The attention modules of ``model`` that expose their heads (found by their attributes, not their
    class): an int head count and head size, and ``nn.Linear`` children projecting to ``heads * head_size``
    (three: q, k, v) or ``3 * heads * head_size`` (one fused qkv)."""
    found: list[AttentionModule] = []
    for name, module in model.named_modules():
        heads_attr, size_attr = _int_attr(module, HEAD_ATTRS), _int_attr(module, HEAD_SIZE_ATTRS)
        if heads_attr is None or size_attr is None:
            continue
        heads, size = int(getattr(module, heads_attr)), int(getattr(module, size_attr))
        linears = [c for c in module.children() if isinstance(c, nn.Linear)]
        separate = [c for c in linears if c.out_features == heads * size]
        fused = [c for c in linears if c.out_features == 3 * heads * size]
        if len(separate) >= 3:
            found.append(AttentionModule(name, module, separate[:3], heads_attr, size_attr, size))
        elif len(fused) == 1:
            found.append(AttentionModule(name, module, fused, heads_attr, size_attr, size))
    return found


def num_heads_of(attention: list[AttentionModule]) -> dict[nn.Module, int]:
    """torch-pruning's ``num_heads`` argument: each projection and the head count of its module."""
    return {proj: a.heads for a in attention for proj in a.projections}


def root_parameters(model: nn.Module, hidden: int) -> list[tuple[nn.Parameter, int]]:
    """torch-pruning's ``unwrapped_parameters``: parameters held directly by a module without a
    torch-pruning pruner (a ViT's ``cls_token`` and position embeddings, on its embeddings module or the
    root) whose last dimension is the residual stream (``hidden`` wide): pruned on that dimension."""
    from torch_pruning import ops as tp_ops

    found = []
    for module in model.modules():
        if tp_ops.module2type(module) != tp_ops.OPTYPE.ELEMENTWISE:
            continue
        for param in module.parameters(recurse=False):
            if param.ndim >= 1 and param.shape[-1] == hidden:
                found.append((param, param.ndim - 1))
    return found


def hidden_ratio(heads_kept: int, heads: int, head_size: int) -> float:
    """The channel ratio that leaves the residual stream ``heads_kept * head_size`` wide under torch-pruning's
    rule ``kept = int(width * (1 - ratio))`` (half a channel of margin against rounding)."""
    width = heads * head_size
    return 1.0 - (heads_kept * head_size + 0.5) / width


def head_ratio(remove: int, heads: int) -> float:
    """The head ratio that makes torch-pruning (``ceil(ratio * heads)`` per layer) remove ``remove`` heads."""
    return 0.0 if remove <= 0 else (remove - 0.5) / heads


def group_kind(group: Any, heads: Heads, graph: Any, hidden: int) -> str:
    """What a torch-pruning group prunes: ``"heads"`` (q/k/v outputs), ``"hidden"`` (the residual stream, which
    q/k/v read, or with a config another width of ``hidden`` channels, e.g. a pooler's: the config's
    ``hidden_size``), ``"mlp"`` (the outputs of an MLP up-projection; without a config, any other width) or
    ``"fixed"`` (a width a config cannot express: left unpruned). ``hidden``: the residual width before the step."""
    projections = {p for a in heads.attention for p in a.projections}
    for dep, _ in group:
        if dep.target.module in projections and graph.is_out_channel_pruning_fn(dep.handler):
            return "heads"
    for dep, _ in group:
        if dep.target.module in projections and graph.is_in_channel_pruning_fn(dep.handler):
            return "hidden"
    if not heads.config:
        return "mlp"
    ups = set(heads.mlp)
    for dep, _ in group:
        if dep.target.module in ups and graph.is_out_channel_pruning_fn(dep.handler):
            return "mlp"
    root = group[0].dep
    width = graph.get_out_channels(root.target.module) if graph.is_out_channel_pruning_fn(root.handler) else None
    return "hidden" if width == hidden else "fixed"


def find_configs(model: nn.Module) -> list[Any]:
    """The distinct Hugging Face configs held by ``model``'s modules (``config`` with a ``hidden_size``)."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "hidden_size") and hasattr(config, "to_dict"):
            configs.setdefault(id(config), config)
    return list(configs.values())


def sync_attention(model: nn.Module, attention: list[AttentionModule], mlp: list[nn.Linear]) -> dict[str, Any]:
    """After a pruning step (or its replay): each attention module's head attributes from its projections'
    shapes, then the configs' ``num_attention_heads``, ``hidden_size`` and ``intermediate_size`` from the
    measured shapes (refused when layers differ: a config has one value for all). Returns the shapes."""
    for a in attention:
        heads = a.measured_heads()
        module: Any = a.module
        setattr(module, a.heads_attr, heads)
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = heads * a.head_size
    shapes = model_shapes(attention, mlp)
    configs = find_configs(model)
    if configs and attention:
        for key in ("heads", "hidden", "mlp_width"):
            values = set(shapes[f"{key}_per_layer"])
            if len(values) > 1:
                raise RuntimeError(
                    f"Pruning left layers with different {key} ({shapes[f'{key}_per_layer']}), which one Hugging Face "
                    "config cannot hold; use the default local pruning (set `global_pruning: false`)."
                )
        for config in configs:
            config.num_attention_heads = shapes["heads_per_layer"][0]
            config.hidden_size = shapes["hidden_per_layer"][0]
            if shapes["mlp_width_per_layer"]:
                config.intermediate_size = shapes["mlp_width_per_layer"][0]
    return shapes


def model_shapes(attention: list[AttentionModule], mlp: list[nn.Linear]) -> dict[str, Any]:
    """Heads, residual width and MLP width per layer, measured on the modules."""
    return {
        "heads_per_layer": [a.measured_heads() for a in attention],
        "hidden_per_layer": [a.projections[0].in_features for a in attention],
        "mlp_width_per_layer": [layer.out_features for layer in mlp],
    }


def mlp_layers(model: nn.Module, attention: list[AttentionModule]) -> list[nn.Linear]:
    """The MLP up-projections: ``nn.Linear`` layers reading the residual stream into ``intermediate_size``
    channels (the config's), or, without a config, into a width other than the residual's."""
    if not attention:
        return []
    hidden = attention[0].projections[0].in_features
    configs = find_configs(model)
    width = getattr(configs[0], "intermediate_size", None) if configs else None
    projections = {p for a in attention for p in a.projections}
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear)
        and m not in projections
        and m.in_features == hidden
        and (m.out_features == width if width is not None else m.out_features not in (hidden, 3 * hidden))
    ]


@dataclass
class Heads:
    """The attention modules of a model that expose their heads, its MLP up-projections and whether a
    Hugging Face config holds their sizes (then only heads, the residual stream and MLP widths are pruned)."""

    attention: list[AttentionModule] = field(default_factory=list)
    mlp: list[nn.Linear] = field(default_factory=list)
    config: bool = False

    @property
    def hidden(self) -> int:
        return self.attention[0].projections[0].in_features if self.attention else 0

    def sync(self, model: nn.Module) -> dict[str, Any]:
        """Module attributes and config from the pruned shapes (:func:`~.heads.sync_attention`)."""
        return sync_attention(model, self.attention, self.mlp) if self.attention else {}


def find_heads(module: nn.Module) -> Heads:
    """:class:`Heads` of ``module`` (empty when no module exposes its heads)."""
    attention = find_attention(module)
    return Heads(attention, mlp_layers(module, attention), bool(find_configs(module))) if attention else Heads()
