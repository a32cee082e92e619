import pytest
import torch
from torch import nn

from lightning_trust.core.batch import (
    BatchContract,
    BatchKeyError,
    batch_size_of,
    forward_no_grad,
    predictions_from_outputs,
)


def test_tuple_batch_defaults():
    x, y, g = torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.tensor([2, 2, 1, 0])
    contract = BatchContract(columns={"group": 2})
    assert contract.inputs((x, y, g)) is x
    assert contract.target([x, y, g]) is y
    assert contract.side((x, y, g), "group") is g


def test_dict_batch_default_keys_and_aliases():
    x, y = torch.randn(4, 3), torch.zeros(4)
    contract = BatchContract()
    for in_key in ("x", "input", "inputs"):
        for t_key in ("y", "target", "label", "labels"):
            batch = {in_key: x, t_key: y, "sex": torch.ones(4)}
            assert contract.inputs(batch) is x
            assert contract.target(batch) is y
            assert torch.equal(contract.side(batch, "sex"), torch.ones(4))


def test_custom_keys_from_flat_dict():
    batch = {"features": torch.ones(2, 5), "income": torch.tensor([1, 0]), "gender": torch.tensor([0, 1])}
    contract = BatchContract.from_keys({"input": "features", "target": "income", "sex": "gender"})
    assert contract.inputs(batch).shape == (2, 5)
    assert contract.target(batch).tolist() == [1, 0]
    assert contract.side(batch, "sex").tolist() == [0, 1]
    assert BatchContract.from_keys(contract.to_keys()).to_keys() == contract.to_keys()


def test_custom_positions_on_tuples():
    batch = (torch.tensor([5, 6]), torch.ones(2, 3), torch.tensor([1, 0]))
    contract = BatchContract.from_keys({"input": 1, "target": 2, "client": 0})
    assert contract.inputs(batch).shape == (2, 3)
    assert contract.target(batch).tolist() == [1, 0]
    assert contract.side(batch, "client").tolist() == [5, 6]


def test_missing_key_lists_available_keys():
    batch = {"features": torch.ones(2, 5), "y": torch.zeros(2), "race": torch.zeros(2)}
    with pytest.raises(BatchKeyError, match=r"'features', 'y', 'race'") as info:
        BatchContract().inputs(batch)
    assert "batch_keys" in str(info.value)
    with pytest.raises(BatchKeyError, match=r"Side column 'sex'.*'features', 'y', 'race'"):
        BatchContract().side(batch, "sex")
    with pytest.raises(BatchKeyError, match=r"no position in this tuple batch.*0 \(Tensor\(2, 5\)\)"):
        BatchContract().side((torch.ones(2, 5), torch.zeros(2)), "sex")
    assert not BatchContract().has_side(batch, "sex")
    assert BatchContract().has_side(batch, "race")


def test_invalid_arguments_are_refused():
    with pytest.raises(TypeError, match="input_key"):
        BatchContract(input_key=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="columns"):
        BatchContract(columns={"sex": [1]})  # type: ignore[dict-item]


def test_resolve_prefers_callback_keys_over_datamodule():
    class DM:
        batch_keys = {"input": "features", "sex": "gender"}

    class T:
        datamodule = DM()

    contract = BatchContract.resolve({"sex": "s"}, T())
    assert contract.input_key == "features" and contract.columns == {"sex": "s"}
    assert BatchContract.resolve(None, None).to_keys() == {}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.lin(self.drop(x))


def test_predictions_forward_keeps_mode_and_no_grad():
    net = _Net().train()
    x = torch.randn(8, 3)
    preds = BatchContract().predictions(net, {"x": x, "y": torch.zeros(8)})
    assert net.training and net.drop.training  # mode restored
    assert not preds.requires_grad
    net.eval()
    assert torch.allclose(preds, net(x))  # computed in eval mode (dropout off)
    assert not net.training
    forward_no_grad(net, x)
    assert not net.training  # eval stays eval


def test_predictions_from_step_outputs():
    x = torch.randn(4, 3)
    logits = torch.randn(4, 2)
    batch = (x, torch.zeros(4))
    assert BatchContract().predictions(_Net(), batch, outputs={"loss": torch.tensor(1.0), "logits": logits}) is not None
    assert torch.equal(BatchContract().predictions(_Net(), batch, outputs={"preds": logits}), logits)
    assert torch.equal(BatchContract().predictions(_Net(), batch, outputs=logits), logits)
    # a loss, a wrong-sized tensor or None fall back to the forward pass
    assert predictions_from_outputs(torch.tensor(0.3)) is None
    assert predictions_from_outputs(torch.randn(5, 2), batch_size=4) is None
    assert predictions_from_outputs(None) is None
    net = _Net().eval()
    assert torch.allclose(BatchContract().predictions(net, batch, outputs=torch.tensor(0.1)), net(x))


def test_batch_size_of():
    assert batch_size_of({"x": torch.ones(7, 2), "y": torch.ones(7)}) == 7
    assert batch_size_of((torch.ones(3, 1, 8, 8), torch.ones(3))) == 3


def test_read_column_from_map_style_datasets():
    from lightning_trust.core.batch import read_column
    from lightning_trust.demo import DictDataset

    ds = DictDataset({"x": torch.randn(10, 2), "y": torch.arange(10) % 2, "sex": torch.arange(10) % 3})
    assert read_column(ds).tolist() == [i % 2 for i in range(10)]
    assert read_column(ds, BatchContract(), "sex", chunk=3).tolist() == [i % 3 for i in range(10)]
    tuples = torch.utils.data.TensorDataset(torch.randn(4, 2), torch.tensor([3, 1, 2, 0]), torch.tensor([1, 1, 0, 0]))
    assert read_column(tuples, BatchContract(columns={"client": 2}), "client").tolist() == [1, 1, 0, 0]
