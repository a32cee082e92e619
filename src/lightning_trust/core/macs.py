"""The one MAC counter: pruning's schedule, its report and the model card all count with it.

Example:
    >>> import torch
    >>> count_macs_params(torch.nn.Linear(3, 2), torch.ones(5, 3))
    (8.0, 8)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from lightning_trust.core.batch import DEFAULT_INPUT_KEYS, call_module
from lightning_trust.core.calls import PositionalInputs
from lightning_trust.core.passes import isolated_eval
from lightning_trust.core.tensors import first_tensor, map_tensors

__all__ = ["count_macs", "count_macs_params"]


def count_macs_params(model: nn.Module, example_input: Any) -> tuple[float, int]:
    """MACs of one sample (the first row of ``example_input``) and parameters, by torch-pruning's
    counter. Keyword inputs (a dict of model arguments) are passed as ``model(**inputs)``, several
    positional inputs (:class:`~lightning_trust.core.PositionalInputs`) as ``model(*inputs)``.

    One row, because ``tp.utils.count_ops_and_params`` averages layers over the batch but not
    element-wise ops; MACs may be fractional (pooling counts half operations).
    """
    import torch_pruning as tp

    sample = map_tensors(example_input, lambda t: t[:1] if t.ndim else t)
    if isinstance(example_input, PositionalInputs):
        # torch-pruning calls model(*sample) and reads the batch size from the first argument
        macs, params = tp.utils.count_ops_and_params(model, tuple(sample))
        return float(macs), int(params)
    if isinstance(sample, Mapping) and any(k in sample for k in DEFAULT_INPUT_KEYS):
        sample = (sample,)  # a dict that is one input, not keyword arguments
    elif isinstance(sample, (tuple, list)):
        sample = (sample,)  # torch-pruning unpacks sequences; the pack passes them as one input
    macs, params = tp.utils.count_ops_and_params(model, dict(sample) if isinstance(sample, Mapping) else sample)
    return float(macs), int(params)


def count_macs(module: nn.Module, trainer: Any, example_input: Any) -> Optional[int]:
    """MACs of one forward pass on one sample of ``example_input``, with every pack callback
    paused; ``None`` for a model neither counter can run. When the forward bypasses the modules'
    hooks (a QAT graph) aten ops are counted instead (``FlopCounterMode``, MACs = FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    example = map_tensors(example_input, lambda t: t.to(device))
    try:
        with isolated_eval(module, trainer, grad=False) as model:
            macs, _ = count_macs_params(model, example)
            if not macs:
                one = map_tensors(example, lambda t: t[:1] if t.ndim else t)
                with FlopCounterMode(display=False) as counter:
                    call_module(model, one)
                macs = counter.get_total_flops() // 2
    except Exception:  # a model the counter cannot trace still gets a card
        return None
    return int(macs) if macs and first_tensor(example) is not None else None
