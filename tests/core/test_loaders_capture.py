"""The one loader finder and the one forward capture."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from torch.utils.data import DataLoader, TensorDataset

from lightning_trust.core import ForwardCapture, find_loader, split_loaders


class _Trainer:
    def __init__(self, datamodule=None, module=None, **loaders):
        self.datamodule, self.lightning_module = datamodule, module
        self.val_dataloaders = loaders.get("val")
        self.test_dataloaders = loaders.get("test")
        self.train_dataloader = loaders.get("train")


def test_trainer_loaders_first_then_datamodule_then_module_hooks():
    loader = DataLoader(TensorDataset(torch.zeros(4, 2)))
    assert split_loaders(_Trainer(val=[loader, {"b": loader}]), "val") == [loader, loader]
    dm = BoringDataModule()
    dm.setup("fit")
    found = split_loaders(_Trainer(datamodule=dm), "val")
    assert len(found) == 1 and len(found[0].dataset) == 64
    assert split_loaders(_Trainer(datamodule=pl.LightningDataModule()), "test") == []  # the default hook
    module = BoringModel()
    assert len(split_loaders(_Trainer(module=module), "test")[0].dataset) == 64
    assert split_loaders(_Trainer(module=pl.LightningModule()), "val") == []
    assert find_loader(_Trainer(module=module), ["test", "val"])[1] == "test"


def test_forward_capture_reads_model_outputs_and_keeps_the_graph_when_asked():
    from transformers.modeling_outputs import SequenceClassifierOutput

    class HFLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, input_ids, attention_mask=None):
            return SequenceClassifierOutput(logits=self.linear(input_ids))

    model = HFLike()
    capture = ForwardCapture(detach=False)
    capture.arm(model, size=4)
    model(input_ids=torch.ones(4, 3))
    model(input_ids=torch.zeros(4, 3))  # only the first call is kept
    assert set(capture.inputs) == {"input_ids"} and capture.inputs["input_ids"].sum() == 12
    output = capture.disarm()
    assert output.requires_grad and output.shape == (4, 2)
    capture = ForwardCapture()
    capture.arm(model, size=5)  # another batch size: nothing kept
    model(input_ids=torch.ones(4, 3))
    assert capture.disarm() is None


def test_forward_capture_ignores_a_torch_export_trace_of_the_armed_module():
    # QAT exports the module inside training_step, while distillation's capture is armed on it: the hook
    # must neither keep the traced (fake) output nor guard the dynamic batch size (export would fail).
    from torch.export import Dim

    model = torch.nn.Linear(3, 2)
    capture = ForwardCapture(detach=False)
    capture.arm(model, size=4)
    x = torch.ones(4, 3)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1)},))
    assert capture.output is None
    assert program.module()(torch.ones(5, 3)).shape == (5, 2)  # the batch stayed dynamic
    out = model(x)
    assert capture.disarm() is out
