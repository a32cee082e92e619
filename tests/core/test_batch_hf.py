"""The batch contract on Hugging Face style batches: dicts of model keyword arguments."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from lightning_trust.core.batch import (
    BatchContract,
    BatchKeyError,
    batch_size_of,
    call_module,
    logits_of,
    predictions_from_outputs,
)


class KeywordModel(nn.Module):
    """A forward with named keyword inputs, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.sum(1))


class KwargsModel(nn.Module):
    """A forward that takes ``**kwargs`` and uses two of them."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = KeywordModel()

    def forward(self, **kwargs):
        return self.inner(kwargs["input_ids"], kwargs.get("attention_mask"))


def hf_batch(n: int = 3, length: int = 5) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 10, (n, length)),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "token_type_ids": torch.zeros(n, length, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0])[:n],
        "sex": torch.tensor([1, 0, 1])[:n],
        "race": torch.tensor([0, 0, 2])[:n],
    }


def test_defaults_target_from_labels_and_hf_inputs_without_a_module():
    batch = hf_batch()
    contract = BatchContract()
    assert sorted(contract.inputs(batch)) == ["attention_mask", "input_ids", "token_type_ids"]
    assert contract.target(batch) is batch["labels"]
    assert contract.side(batch, "sex") is batch["sex"]
    assert contract.keyword_inputs(batch)
    assert batch_size_of(batch) == 3


def test_inputs_follow_the_bound_module_signature():
    batch = hf_batch()
    model = KeywordModel()
    contract = BatchContract().bind(model)
    inputs = contract.inputs(batch)
    assert sorted(inputs) == ["attention_mask", "input_ids", "token_type_ids"]  # labels (target), sex, race left out
    expected = model(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(call_module(model, inputs), expected)


def test_explicit_input_keys_from_yaml_style_batch_keys():
    batch = hf_batch()
    contract = BatchContract.from_keys({"input_keys": ["input_ids", "attention_mask"], "gender": "sex"})
    assert list(contract.inputs(batch)) == ["input_ids", "attention_mask"]
    assert contract.side(batch, "gender") is batch["sex"]
    assert BatchContract.from_keys(contract.to_keys()).input_keys == ("input_ids", "attention_mask")
    with pytest.raises(BatchKeyError, match=r"\['pixel_values'\].*'input_ids', 'attention_mask'"):
        BatchContract(input_keys=["pixel_values"]).inputs(batch)
    with pytest.raises(ValueError, match="not both"):
        BatchContract(input_key="x", input_keys=["input_ids"])
    with pytest.raises(TypeError, match="non-empty list"):
        BatchContract(input_keys="input_ids")  # type: ignore[arg-type]


def test_a_forward_taking_kwargs_gets_every_tensor_but_target_and_side_columns():
    batch = hf_batch()
    model = KwargsModel()
    contract = BatchContract(side_keys=["sex", "race"]).bind(model)
    assert sorted(contract.inputs(batch)) == ["attention_mask", "input_ids", "token_type_ids"]
    out = call_module(model, contract.inputs(batch))
    assert out.shape == (3, 2)


def test_resolve_binds_to_the_trainers_module_and_adds_side_keys():
    class _Trainer:
        lightning_module = KwargsModel()
        datamodule = None

    contract = BatchContract.resolve({}, _Trainer(), side_keys=["sex"])
    assert contract.forward_params is None and "sex" in contract.side_keys
    assert "sex" not in contract.inputs(hf_batch()) and "race" in contract.inputs(hf_batch())


def test_missing_inputs_lists_the_batch_keys_and_the_fix():
    batch = {"ids": torch.ones(2, 3), "labels": torch.zeros(2)}
    with pytest.raises(BatchKeyError, match=r"'ids', 'labels'.*input_keys"):
        BatchContract().inputs(batch)
    with pytest.raises(
        BatchKeyError, match=r"forward arguments \(\['attention_mask', 'input_ids', 'labels', 'token_type_ids'\]\)"
    ):
        BatchContract().bind(KeywordModel()).inputs(batch)


def test_logits_from_every_kind_of_output():
    logits = torch.randn(3, 2)
    from transformers.modeling_outputs import SequenceClassifierOutput

    Out = namedtuple("Out", ["loss", "logits"])
    outputs = [
        logits,
        SequenceClassifierOutput(loss=torch.tensor(0.5), logits=logits),
        {"loss": torch.tensor(0.5), "logits": logits},
        {"preds": logits},
        (torch.tensor(0.5), logits),  # HF's return_dict=False: (loss, logits)
        [logits],
        Out(torch.tensor(0.5), logits),
    ]
    for output in outputs:
        assert logits_of(output) is logits, type(output)
    with pytest.raises(TypeError, match=r"Cannot find predictions.*Return the logits"):
        logits_of("nope")
    assert predictions_from_outputs(SequenceClassifierOutput(logits=logits), batch_size=3) is not None
    assert predictions_from_outputs({"loss": torch.tensor(1.0)}) is None


def test_batch_size_of_every_batch_kind():
    assert batch_size_of((torch.ones(7, 2), torch.zeros(7))) == 7
    assert batch_size_of({"x": torch.ones(5, 2), "y": torch.zeros(5)}) == 5
    assert batch_size_of(hf_batch(n=2)) == 2
    assert batch_size_of({"pixel_values": torch.ones(4, 1, 8, 8), "labels": torch.zeros(4)}) == 4


def test_call_module_passes_tensors_and_dict_inputs_positionally():
    class DictInput(nn.Module):
        def forward(self, x):
            return x["a"] + x["b"]

    assert torch.equal(call_module(nn.Identity(), torch.ones(2)), torch.ones(2))
    one_dict = {"a": torch.ones(1), "b": torch.full((1,), 2.0)}  # one input that is a dict: passed positionally
    assert call_module(DictInput(), one_dict).item() == 3.0
    assert call_module(KeywordModel(), {"input_ids": torch.zeros(2, 3, dtype=torch.long)}).shape == (2, 2)
    assert call_module(KwargsModel(), {"input_ids": torch.zeros(2, 3, dtype=torch.long)}).shape == (2, 2)


def test_a_callbacks_single_input_wins_over_the_datamodules_keyword_inputs():
    class _Trainer:
        lightning_module = None

        class datamodule:
            batch_keys = {"input_keys": ["input_ids", "attention_mask"], "target": "labels"}

    batch = hf_batch()
    assert BatchContract.resolve({"input": "input_ids"}, _Trainer()).inputs(batch) is batch["input_ids"]
    assert list(BatchContract.resolve(None, _Trainer()).inputs(batch)) == ["input_ids", "attention_mask"]
    assert list(BatchContract.resolve({"input_keys": ["input_ids"]}, _Trainer()).inputs(batch)) == ["input_ids"]
