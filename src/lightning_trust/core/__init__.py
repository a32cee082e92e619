"""What every area of the pack shares, in one place.

=================  ==========================================================================
module             concern
=================  ==========================================================================
``batch``          the batch contract: inputs (tensor or model keyword arguments), target, side
                   columns, batch size
``calls``          calling a module on a batch's inputs; logits from any output
``protocol``       the report protocol (sections, stable names) and the pause protocol
``compat``         declared capabilities and the one compatibility check
``callback``       the base class of the pack's callbacks
``passes``         isolated extra passes: forked RNGs, restored modes, paused DP hooks
``tensors``        the one collection walker and JSON cleaner
``loaders``        finding a Trainer's or datamodule's dataloaders
``capture``        reusing the forward a user's step already ran
``output``         run folders, JSON, figures, logging, warnings once per run
``macs``           the one MAC counter (pruning, its report and the model card)
``budget``         the one overhead budget of callbacks that add passes (``max_overhead``)
``seam``           every private attribute of Lightning and other libraries the pack needs
=================  ==========================================================================

Example:
    >>> from lightning_trust.core import BatchContract, call_module, logits_of
    >>> import torch
    >>> logits_of(call_module(torch.nn.Linear(3, 2), BatchContract().inputs((torch.ones(4, 3), torch.zeros(4))))).shape
    torch.Size([4, 2])
"""

from lightning_trust.core.batch import (
    BatchContract,
    BatchKeyError,
    PositionalInputs,
    batch_size_of,
    call_module,
    describe_keys,
    forward_no_grad,
    logits_of,
    logits_or_none,
    predictions_from_outputs,
    read_column,
)
from lightning_trust.core.budget import DEFAULT_MAX_OVERHEAD, OverheadBudget, check_max_overhead
from lightning_trust.core.callback import TrustCallback
from lightning_trust.core.capture import ForwardCapture, step_predictions
from lightning_trust.core.compat import (
    Capability,
    IncompatibleCallbacksError,
    callbacks_with,
    capabilities_of,
    check_compatibility,
    find_callback,
)
from lightning_trust.core.loaders import all_loaders, find_loader, first_loader, split_loaders
from lightning_trust.core.output import (
    DeferredFigures,
    artifact_dir,
    log_metrics,
    new_figure,
    reset_warnings,
    save_figure,
    warn_once,
    write_json,
)
from lightning_trust.core.passes import fork_rngs, isolated_eval, saved_modes, unwrap_module
from lightning_trust.core.protocol import (
    FIGURES_KEY,
    SECTIONS,
    DuplicateSectionError,
    Pausable,
    Reportable,
    collect_reports,
    report_name,
    reportable_callbacks,
    section_names,
)
from lightning_trust.core.tensors import first_tensor, iter_tensors, map_tensors, tensor_bytes, to_jsonable

__all__ = [
    "DEFAULT_MAX_OVERHEAD",
    "FIGURES_KEY",
    "SECTIONS",
    "BatchContract",
    "BatchKeyError",
    "Capability",
    "DeferredFigures",
    "DuplicateSectionError",
    "ForwardCapture",
    "IncompatibleCallbacksError",
    "OverheadBudget",
    "Pausable",
    "PositionalInputs",
    "Reportable",
    "TrustCallback",
    "all_loaders",
    "artifact_dir",
    "batch_size_of",
    "call_module",
    "callbacks_with",
    "capabilities_of",
    "check_compatibility",
    "check_max_overhead",
    "collect_reports",
    "describe_keys",
    "find_callback",
    "find_loader",
    "first_loader",
    "first_tensor",
    "fork_rngs",
    "forward_no_grad",
    "isolated_eval",
    "iter_tensors",
    "log_metrics",
    "logits_of",
    "logits_or_none",
    "map_tensors",
    "new_figure",
    "predictions_from_outputs",
    "read_column",
    "report_name",
    "reportable_callbacks",
    "reset_warnings",
    "save_figure",
    "saved_modes",
    "section_names",
    "split_loaders",
    "step_predictions",
    "tensor_bytes",
    "to_jsonable",
    "unwrap_module",
    "warn_once",
    "write_json",
]
