"""The batch contract: the one place that tells every callback how to read a user's batch.

A batch (or a single dataset sample) is either

* a tuple/list ``(inputs, target, *rest)``: inputs at position 0, target at position 1, side
  columns only where the user names their position (``{"sex": 2}``); when the bound module's
  ``forward`` requires N > 1 positional arguments (``LightningTransformer.forward(inputs,
  target)``), the inputs are the first N elements, a :class:`PositionalInputs`; or
* a mapping: inputs under the first of ``"x"``, ``"input"``, ``"inputs"``; the target under the
  first of ``"y"``, ``"target"``, ``"label"``, ``"labels"``; side columns (sensitive features,
  domain, client id...) under their own name unless mapped to another key; or
* a Hugging Face style mapping of model keyword arguments (``input_ids``, ``attention_mask``,
  ``token_type_ids``, ``pixel_values``...) plus ``labels`` and side columns, with none of the
  input keys above: the inputs are then a dict of the keys the module's ``forward`` accepts (read
  from its signature once the contract is bound to the module), or the keys named in
  ``input_keys``, minus the target and the side columns.

Every key can be overridden with a plain ``dict`` (``batch_keys``) that a LightningCLI YAML sets::

    callbacks:
      - class_path: FairnessMetrics
        init_args:
          sensitive_features: [gender]
          batch_keys: {input: features, target: label, gender: 3}
      - class_path: Attribution
        init_args:
          batch_keys: {input_keys: [input_ids, attention_mask]}

A DataModule may also carry a ``batch_keys`` attribute; a callback's own argument wins over it.
Modules are called with :func:`call_module` (``module(**inputs)`` for keyword inputs), their
outputs read with :func:`logits_of` (a tensor, ``ModelOutput.logits``, a dict, a tuple).

Example:
    >>> import torch
    >>> contract = BatchContract()
    >>> batch = {"x": torch.ones(4, 3), "y": torch.zeros(4), "sex": torch.tensor([0, 1, 0, 1])}
    >>> contract.inputs(batch).shape, contract.side(batch, "sex").tolist()
    (torch.Size([4, 3]), [0, 1, 0, 1])
    >>> hf = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
    ...       "labels": torch.tensor([0, 1]), "sex": torch.tensor([1, 0])}
    >>> sorted(BatchContract(side_keys=["sex"]).inputs(hf)), batch_size_of(hf)
    (['attention_mask', 'input_ids'], 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from lightning_trust.core.calls import (
    PREDICTION_KEYS,
    PositionalInputs,
    ScoresModule,
    call_module,
    forward_no_grad,
    forward_parameters,
    logits_of,
    logits_or_none,
    predictions_from_outputs,
    required_positional,
)
from lightning_trust.core.tensors import first_tensor

__all__ = [
    "PREDICTION_KEYS",
    "BatchContract",
    "BatchKeyError",
    "PositionalInputs",
    "ScoresModule",
    "batch_size_of",
    "call_module",
    "describe_keys",
    "forward_no_grad",
    "forward_parameters",
    "logits_of",
    "logits_or_none",
    "predictions_from_outputs",
    "read_column",
]

Key = Union[str, int]

DEFAULT_INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs")
DEFAULT_TARGET_KEYS: tuple[str, ...] = ("y", "target", "label", "labels")
#: Hugging Face model keyword inputs, recognised in a dict batch before the contract knows the module.
HF_INPUT_KEYS: tuple[str, ...] = (
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "pixel_values",
    "pixel_mask", "input_values", "input_features", "decoder_input_ids", "decoder_attention_mask",
)  # fmt: skip
#: ``batch_keys`` entries that configure the contract itself rather than name a side column.
RESERVED_KEYS: tuple[str, ...] = ("input", "target", "input_keys")


class BatchKeyError(KeyError):
    """A key the contract needs is not in the batch; the message lists the keys the batch has."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def describe_keys(batch: Any) -> str:
    """Human-readable list of what a batch offers: its dict keys or its tuple positions."""
    if isinstance(batch, Mapping):
        return ", ".join(repr(k) for k in batch) or "(empty mapping)"
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return ", ".join(f"{i} ({_kind(v)})" for i, v in enumerate(batch)) or "(empty sequence)"
    return f"a single {_kind(batch)} (no keys)"


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    return type(value).__name__


class BatchContract:
    """Reads inputs, target and named side columns from tuple, dict and Hugging Face batches.

    Args:
        input_key: key or position of the inputs; default: ``"x"``/``"input"``/``"inputs"`` for a
            dict, position 0 for a tuple.
        target_key: key or position of the target; default: ``"y"``/``"target"``/``"label"``/
            ``"labels"`` for a dict, position 1 for a tuple.
        columns: side-column name -> key (dict batches) or position (tuple batches). Unmapped side
            columns are looked up under their own name in dict batches.
        input_keys: the model keyword inputs of a dict batch (``[input_ids, attention_mask]``);
            default: the keys the bound module's ``forward`` accepts.
        side_keys: further keys that are never model inputs (a callback's sensitive features).

    Example:
        >>> BatchContract(columns={"sex": 2}).side((torch.ones(2, 3), torch.ones(2), torch.tensor([1, 0])), "sex")
        tensor([1, 0])
    """

    def __init__(
        self,
        input_key: Optional[Key] = None,
        target_key: Optional[Key] = None,
        columns: Optional[Mapping[str, Key]] = None,
        input_keys: Optional[Sequence[str]] = None,
        side_keys: Optional[Sequence[str]] = None,
    ) -> None:
        for name, key in (("input_key", input_key), ("target_key", target_key)):
            if key is not None and not isinstance(key, (str, int)):
                raise TypeError(f"`{name}` must be a str key or an int position, got {key!r}.")
        columns = dict(columns or {})
        for name, key in columns.items():
            if not isinstance(name, str) or not isinstance(key, (str, int)):
                raise TypeError(
                    f"`columns` maps a side-column name to a str key or an int position, got {name!r}: {key!r}."
                )
        if input_keys is not None:
            if isinstance(input_keys, str) or not all(isinstance(k, str) for k in input_keys) or not input_keys:
                raise TypeError(f"`input_keys` must be a non-empty list of str keys, got {input_keys!r}.")
            if input_key is not None:
                raise ValueError(
                    f"Set either `input: {input_key!r}` (one input) or `input_keys: {list(input_keys)!r}` "
                    "(keyword inputs), not both."
                )
        self.input_key = input_key
        self.target_key = target_key
        self.columns = columns
        self.input_keys: Optional[tuple[str, ...]] = tuple(input_keys) if input_keys is not None else None
        self.side_keys: frozenset[str] = frozenset(side_keys or ())
        self.forward_params: Optional[frozenset[str]] = None
        self.positional_inputs = 1  # positional arguments the bound module's forward requires
        self._bound = False

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_keys(cls, batch_keys: Optional[Mapping[str, Any]] = None) -> BatchContract:
        """Build from the flat ``batch_keys`` dict a callback takes: ``input``/``target``/
        ``input_keys`` and side columns."""
        keys = dict(batch_keys or {})
        input_keys = keys.pop("input_keys", None)
        return cls(
            input_key=keys.pop("input", None),
            target_key=keys.pop("target", None),
            columns=keys,
            input_keys=list(input_keys) if input_keys is not None else None,
        )

    @classmethod
    def resolve(
        cls,
        batch_keys: Union[Mapping[str, Any], BatchContract, None] = None,
        trainer: Any = None,
        side_keys: Optional[Sequence[str]] = None,
    ) -> BatchContract:
        """The contract a callback uses: its own ``batch_keys`` over the datamodule's, over the
        defaults; bound to the Trainer's module (so keyword inputs follow its ``forward``)."""
        if isinstance(batch_keys, BatchContract):
            contract = batch_keys
        else:
            merged: dict[str, Any] = {}
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
            dm_keys = getattr(datamodule, "batch_keys", None)
            if isinstance(dm_keys, BatchContract):
                merged.update(dm_keys.to_keys())
            elif isinstance(dm_keys, Mapping):
                merged.update(dm_keys)
            own = dict(batch_keys or {})
            if "input" in own:  # the callback's single input wins over the datamodule's keyword inputs
                merged.pop("input_keys", None)
            if "input_keys" in own:
                merged.pop("input", None)
            merged.update(own)
            contract = cls.from_keys(merged)
        if side_keys:
            contract.side_keys = contract.side_keys | frozenset(side_keys)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if isinstance(module, nn.Module):
            contract.bind(module)
        return contract

    def bind(self, module: nn.Module) -> BatchContract:
        """Read the keyword inputs ``module.forward`` accepts; returns ``self``."""
        from lightning_trust.core.passes import unwrap_module

        self.forward_params = forward_parameters(unwrap_module(module))
        self.positional_inputs = required_positional(unwrap_module(module))
        self._bound = True
        return self

    def to_keys(self) -> dict[str, Any]:
        """The flat ``batch_keys`` dict that rebuilds this contract."""
        keys: dict[str, Any] = dict(self.columns)
        if self.input_key is not None:
            keys["input"] = self.input_key
        if self.target_key is not None:
            keys["target"] = self.target_key
        if self.input_keys is not None:
            keys["input_keys"] = list(self.input_keys)
        return keys

    def __repr__(self) -> str:
        extra = f", input_keys={list(self.input_keys)!r}" if self.input_keys is not None else ""
        return (
            f"{type(self).__name__}(input_key={self.input_key!r}, target_key={self.target_key!r}, "
            f"columns={self.columns!r}{extra})"
        )

    # reading --------------------------------------------------------------------------------
    def inputs(self, batch: Any) -> Any:
        """The model inputs of a batch or sample: a tensor (or what the user stores), or a dict of
        model keyword arguments for Hugging Face style batches."""
        if isinstance(batch, Tensor):
            return batch  # a bare tensor batch is all inputs
        if isinstance(batch, Mapping) and self.input_key is None:
            if self.input_keys is not None:
                missing = [k for k in self.input_keys if k not in batch]
                if missing:
                    raise BatchKeyError(
                        f"`input_keys` names {missing!r}, which the batch lacks; the batch has keys: "
                        f"{describe_keys(batch)}. Fix `batch_keys: {{input_keys: [...]}}`."
                    )
                return {k: batch[k] for k in self.input_keys}
            if not any(k in batch for k in DEFAULT_INPUT_KEYS):
                return self._keyword_inputs(batch)
        if (
            self.positional_inputs > 1
            and self.input_key is None
            and isinstance(batch, (tuple, list))
            and len(batch) >= self.positional_inputs
        ):
            return PositionalInputs(batch[: self.positional_inputs])
        return self._get(batch, "inputs", self.input_key, DEFAULT_INPUT_KEYS, 0)

    def keyword_inputs(self, batch: Any) -> bool:
        """Whether this batch's inputs are model keyword arguments (a dict passed as ``**inputs``)."""
        return (
            isinstance(batch, Mapping)
            and self.input_key is None
            and (self.input_keys is not None or not any(k in batch for k in DEFAULT_INPUT_KEYS))
        )

    def _keyword_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        excluded = set(self.side_keys) | {str(k) for k in self.columns.values()} | set(self.columns)
        target = self._target_key_in(batch)
        if target is not None:
            excluded.add(target)
        if self.forward_params is not None:  # the module's forward names its inputs
            chosen = {k: v for k, v in batch.items() if k in self.forward_params and k not in excluded}
        elif self._bound:  # a forward taking **kwargs: every other tensor of the batch
            chosen = {k: v for k, v in batch.items() if k not in excluded and isinstance(v, Tensor)}
        else:  # no module known yet: the Hugging Face input names
            chosen = {k: v for k, v in batch.items() if k in HF_INPUT_KEYS and k not in excluded}
        if not chosen:
            accepted = (
                sorted(self.forward_params)
                if self.forward_params is not None
                else ("any keyword" if self._bound else list(HF_INPUT_KEYS))
            )
            raise BatchKeyError(
                f"No inputs in the batch: it has none of {', '.join(map(repr, DEFAULT_INPUT_KEYS))} and none of the "
                f"module's forward arguments ({accepted}); the batch has keys: {describe_keys(batch)}. Set "
                "`batch_keys: {input: <key>}` or `batch_keys: {input_keys: [<key>, ...]}`."
            )
        return chosen

    def _target_key_in(self, batch: Mapping[str, Any]) -> Optional[str]:
        if isinstance(self.target_key, str):
            return self.target_key
        return next((k for k in DEFAULT_TARGET_KEYS if k in batch), None)

    def target(self, batch: Any) -> Any:
        """The target of a batch or sample."""
        return self._get(batch, "target", self.target_key, DEFAULT_TARGET_KEYS, 1)

    def has_target(self, batch: Any) -> bool:
        try:
            self.target(batch)
        except BatchKeyError:
            return False
        return True

    def side(self, batch: Any, name: str) -> Any:
        """A named side column (sensitive feature, domain, client id...) of a batch or sample."""
        key = self.columns.get(name, name)
        if isinstance(batch, Mapping):
            if key in batch:
                return batch[key]
            raise BatchKeyError(
                f"Side column {name!r} (key {key!r}) is not in the batch; the batch has keys: "
                f"{describe_keys(batch)}. Map it with `batch_keys: {{{name}: <key>}}`."
            )
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            if isinstance(key, int):
                if -len(batch) <= key < len(batch):
                    return batch[key]
                raise BatchKeyError(
                    f"Side column {name!r} is mapped to position {key}, but the batch has positions: "
                    f"{describe_keys(batch)}."
                )
            raise BatchKeyError(
                f"Side column {name!r} has no position in this tuple batch (positions: {describe_keys(batch)}). "
                f"Name its position with `batch_keys: {{{name}: <int>}}`, or yield dict batches."
            )
        raise BatchKeyError(f"Side column {name!r} cannot be read from {describe_keys(batch)}.")

    def has_side(self, batch: Any, name: str) -> bool:
        try:
            self.side(batch, name)
        except BatchKeyError:
            return False
        return True

    def _get(self, batch: Any, what: str, key: Optional[Key], defaults: tuple[str, ...], position: int) -> Any:
        override = "input" if what == "inputs" else "target"
        if isinstance(batch, Mapping):
            candidates: tuple[Key, ...] = (key,) if key is not None else defaults
            for candidate in candidates:
                if candidate in batch:
                    return batch[candidate]
            raise BatchKeyError(
                f"No {what} in the batch: looked for {', '.join(map(repr, candidates))}; the batch has keys: "
                f"{describe_keys(batch)}. Set `batch_keys: {{{override}: <key>}}`."
            )
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            index = key if isinstance(key, int) else position
            if isinstance(key, str):
                raise BatchKeyError(
                    f"`{override}` is set to the key {key!r}, but the batch is a {type(batch).__name__} with "
                    f"positions: {describe_keys(batch)}. Use an int position."
                )
            if -len(batch) <= index < len(batch):
                return batch[index]
            raise BatchKeyError(f"No {what} at position {index}; the batch has positions: {describe_keys(batch)}.")
        raise BatchKeyError(f"No {what} in {describe_keys(batch)}: expected a tuple/list or a dict batch.")

    # predictions ----------------------------------------------------------------------------
    def predictions(self, module: nn.Module, batch: Any, outputs: Any = None) -> Tensor:
        """The module's predictions (logits, scores or probabilities) for ``batch``.

        Taken from ``outputs`` (what ``validation_step``/``test_step`` returned) when it holds them: a
        tensor with one row per sample, a dict with one of :data:`PREDICTION_KEYS` or a
        ``ModelOutput``. Otherwise the module's forward runs on the inputs under
        ``torch.no_grad()``; its train/eval mode is left as it was.
        """
        from_outputs = predictions_from_outputs(outputs, batch_size=batch_size_of(batch, self))
        if from_outputs is not None:
            return from_outputs
        return forward_no_grad(module, self.inputs(batch))


def batch_size_of(batch: Any, contract: Optional[BatchContract] = None, missing_ok: bool = False) -> Optional[int]:
    """Number of samples in a batch (the leading size of its first input tensor); ``None`` without one, and
    with ``missing_ok`` also when the contract finds no inputs (instead of its :class:`BatchKeyError`)."""
    try:
        inputs = (contract or BatchContract()).inputs(batch)
    except BatchKeyError:
        if missing_ok:
            return None
        raise
    found = first_tensor(inputs, min_ndim=1)
    return int(found.shape[0]) if found is not None else None


def read_column(
    dataset: Any, contract: Optional[BatchContract] = None, name: str = "target", chunk: int = 4096
) -> np.ndarray:
    """One column of a map-style dataset (``"target"`` or a side-column name) as a 1-D numpy array.

    Samples are read in chunks (``__getitems__`` when the dataset has it), collated like a
    DataLoader would and read with the batch contract.
    """
    contract = contract or BatchContract()
    n = len(dataset)
    values = []
    getitems = getattr(dataset, "__getitems__", None)
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        samples = getitems(idx) if getitems is not None else [dataset[i] for i in idx]
        batch = default_collate(samples)
        column = contract.target(batch) if name == "target" else contract.side(batch, name)
        values.append(torch.as_tensor(column).reshape(len(idx), -1)[:, 0].cpu().numpy())
    return np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
