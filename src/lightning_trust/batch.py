"""The batch contract: the one place that tells every callback how to read a user's batch.

A batch (or a single dataset sample) is either

* a tuple/list ``(inputs, target, *rest)``: inputs at position 0, target at position 1, side
  columns only where the user names their position (``{"sex": 2}``); or
* a mapping: inputs under the first of ``"x"``, ``"input"``, ``"inputs"``; the target under the
  first of ``"y"``, ``"target"``, ``"label"``, ``"labels"``; side columns (sensitive features,
  domain, client id...) under their own name unless mapped to another key.

Every key can be overridden with a plain ``dict`` (``batch_keys``) that a LightningCLI YAML sets::

    callbacks:
      - class_path: FairnessMetrics
        init_args:
          sensitive_features: [gender]
          batch_keys: {input: features, target: label, gender: 3}

A DataModule may also carry a ``batch_keys`` attribute; a callback's own argument wins over it.

Example:
    >>> import torch
    >>> contract = BatchContract()
    >>> batch = {"x": torch.ones(4, 3), "y": torch.zeros(4), "sex": torch.tensor([0, 1, 0, 1])}
    >>> contract.inputs(batch).shape, contract.side(batch, "sex").tolist()
    (torch.Size([4, 3]), [0, 1, 0, 1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import numpy as np
from torch import Tensor, nn
from torch.utils.data import default_collate

Key = Union[str, int]

DEFAULT_INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs")
DEFAULT_TARGET_KEYS: tuple[str, ...] = ("y", "target", "label", "labels")
#: Keys in a step's returned dict that are taken as the module's predictions, in this order.
PREDICTION_KEYS: tuple[str, ...] = ("logits", "preds", "y_hat", "probs", "scores", "output", "outputs")
_RESERVED = ("input", "target")


class BatchKeyError(KeyError):
    """A key the contract needs is not in the batch; the message lists the keys the batch has."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def describe_keys(batch: Any) -> str:
    """Human-readable list of what a batch offers: its dict keys or its tuple positions."""
    if isinstance(batch, Mapping):
        return ", ".join(repr(k) for k in batch.keys()) or "(empty mapping)"
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return ", ".join(f"{i} ({_kind(v)})" for i, v in enumerate(batch)) or "(empty sequence)"
    return f"a single {_kind(batch)} (no keys)"


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    return type(value).__name__


class BatchContract:
    """Reads inputs, target and named side columns from tuple and dict batches.

    Args:
        input_key: key or position of the inputs; default: ``"x"``/``"input"``/``"inputs"`` for a
            dict, position 0 for a tuple.
        target_key: key or position of the target; default: ``"y"``/``"target"``/``"label"``/
            ``"labels"`` for a dict, position 1 for a tuple.
        columns: side-column name -> key (dict batches) or position (tuple batches). Unmapped side
            columns are looked up under their own name in dict batches.

    Example:
        >>> BatchContract(columns={"sex": 2}).side((torch.ones(2, 3), torch.ones(2), torch.tensor([1, 0])), "sex")
        tensor([1, 0])
    """

    def __init__(
        self,
        input_key: Optional[Key] = None,
        target_key: Optional[Key] = None,
        columns: Optional[Mapping[str, Key]] = None,
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
        self.input_key = input_key
        self.target_key = target_key
        self.columns = columns

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_keys(cls, batch_keys: Optional[Mapping[str, Key]] = None) -> BatchContract:
        """Build from the flat ``batch_keys`` dict a callback takes: ``input``/``target`` and side columns."""
        keys = dict(batch_keys or {})
        return cls(input_key=keys.pop("input", None), target_key=keys.pop("target", None), columns=keys)

    @classmethod
    def resolve(
        cls, batch_keys: Union[None, Mapping[str, Key], BatchContract] = None, trainer: Any = None
    ) -> BatchContract:
        """The contract a callback uses: its own ``batch_keys`` over the datamodule's, over the defaults."""
        if isinstance(batch_keys, BatchContract):
            return batch_keys
        merged: dict[str, Key] = {}
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        dm_keys = getattr(datamodule, "batch_keys", None)
        if isinstance(dm_keys, BatchContract):
            merged.update(dm_keys.to_keys())
        elif isinstance(dm_keys, Mapping):
            merged.update(dm_keys)
        merged.update(batch_keys or {})
        return cls.from_keys(merged)

    def to_keys(self) -> dict[str, Key]:
        """The flat ``batch_keys`` dict that rebuilds this contract."""
        keys: dict[str, Key] = dict(self.columns)
        if self.input_key is not None:
            keys["input"] = self.input_key
        if self.target_key is not None:
            keys["target"] = self.target_key
        return keys

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_key={self.input_key!r}, target_key={self.target_key!r}, columns={self.columns!r})"

    # reading --------------------------------------------------------------------------------
    def inputs(self, batch: Any) -> Any:
        """The model inputs of a batch or sample."""
        if isinstance(batch, Tensor):
            return batch  # a bare tensor batch is all inputs
        return self._get(batch, "inputs", self.input_key, DEFAULT_INPUT_KEYS, 0)

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
            raise BatchKeyError(
                f"No {what} at position {index}; the batch has positions: {describe_keys(batch)}."
            )
        raise BatchKeyError(f"No {what} in {describe_keys(batch)}: expected a tuple/list or a dict batch.")

    # predictions ----------------------------------------------------------------------------
    def predictions(self, module: nn.Module, batch: Any, outputs: Any = None) -> Tensor:
        """The module's predictions (logits, scores or probabilities) for ``batch``.

        Taken from ``outputs`` (what ``validation_step``/``test_step`` returned) when it holds them: a
        tensor with one row per sample, or a dict with one of :data:`PREDICTION_KEYS`. Otherwise the
        module's forward runs on the inputs under ``torch.no_grad()``; its train/eval mode is left as
        it was.
        """
        from_outputs = predictions_from_outputs(outputs, batch_size=_batch_size(self.inputs(batch)))
        if from_outputs is not None:
            return from_outputs
        return forward_no_grad(module, self.inputs(batch))


def predictions_from_outputs(outputs: Any, batch_size: Optional[int] = None) -> Optional[Tensor]:
    """The predictions held by a step's return value, or ``None`` when it holds none."""
    candidate: Any = None
    if isinstance(outputs, Tensor):
        candidate = outputs
    elif isinstance(outputs, Mapping):
        for key in PREDICTION_KEYS:
            if key in outputs:
                candidate = outputs[key]
                break
    if not isinstance(candidate, Tensor) or candidate.ndim == 0:
        return None  # a scalar is a loss, not predictions
    if batch_size is not None and candidate.shape[0] != batch_size:
        return None
    return candidate.detach()


def forward_no_grad(module: nn.Module, inputs: Any) -> Tensor:
    """``module(inputs)`` under ``torch.no_grad()`` in eval mode, restoring each submodule's mode."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            return module(inputs)
    finally:
        for m, training in modes:
            m.training = training


def _batch_size(inputs: Any) -> Optional[int]:
    if isinstance(inputs, Tensor) and inputs.ndim > 0:
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            size = _batch_size(value)
            if size is not None:
                return size
    if isinstance(inputs, (list, tuple)) and inputs:
        return _batch_size(inputs[0])
    return None


def batch_size_of(batch: Any, contract: Optional[BatchContract] = None) -> Optional[int]:
    """Number of samples in a batch (from its inputs)."""
    return _batch_size((contract or BatchContract()).inputs(batch))


def read_column(dataset: Any, contract: Optional[BatchContract] = None, name: str = "target", chunk: int = 4096) -> np.ndarray:
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
