"""Seam (compression helper C1): an exported graph run without rebuilding its output pytree.

Example:
    >>> import torch
    >>> graph = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),)).module()
    >>> with flat_outputs(graph):  # the graph's code itself (``__call__`` also checks the input spec)
    ...     type(graph.forward(torch.ones(1, 2))).__name__
    'tuple'
    >>> type(graph(torch.ones(1, 2))).__name__
    'Tensor'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["flat_outputs"]


@contextlib.contextmanager
def flat_outputs(
    graph_module: torch.fx.GraphModule,
) -> Iterator[Callable[[torch.fx.GraphModule], torch.fx.GraphModule]]:
    """Inside, ``graph_module`` takes its flattened inputs and returns its flat outputs (no pytree
    rebuilding); on exit its own code generator (pytree in/out specs) is back. Yields a function
    that gives that code generator to another graph module built meanwhile (a pass's result).

    Why private: torchao's ``convert_pt2e`` constant-folds the graph with an ``fx.Interpreter``
    that feeds placeholder sentinels and then rebuilds the outputs with the graph's pytree spec; a
    Hugging Face ``DynamicCache`` in the outputs (GPT-2's ``past_key_values``) cannot be rebuilt
    from sentinels and the conversion crashes. ``Graph.set_codegen`` is public, but reading the
    graph's current code generator to put it back is only possible through ``Graph._codegen``.
    """
    graph = graph_module.graph
    original = graph._codegen
    graph.set_codegen(torch.fx.graph.CodeGen())
    graph_module.recompile()

    def restore(other: torch.fx.GraphModule) -> torch.fx.GraphModule:
        other.graph.set_codegen(original)
        other.recompile()
        return other

    try:
        yield restore
    finally:
        graph.set_codegen(original)
        graph_module.recompile()
