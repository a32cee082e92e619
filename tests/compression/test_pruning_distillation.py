"""Distillation during recovery: the dense model before the first step is the frozen teacher; the added
gradient is the Hinton KL gradient computed by hand."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_trust.compression import ProgressivePruning
from lightning_trust.compression.distillation import Distillation, distillation_loss
from lightning_trust.core.batch import BatchContract
from tests.foundation.models import build
from tests.support import trainer as make_trainer


class _Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_distillation_loss_is_t_squared_kl_of_softened_logits():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    p, q = F.softmax(s / 3.0, -1), F.softmax(t / 3.0, -1)
    by_hand = 9.0 * (q * (q.log() - p.log())).sum(-1).mean()
    assert distillation_loss(s, t, 3.0).item() == pytest.approx(by_hand.item(), rel=1e-6)


@pytest.mark.parametrize("temperature, weight", [(2.0, 0.5), (4.0, 0.9), (1.0, 1.0)])
def test_added_gradient_equals_the_kl_gradient_by_hand(temperature, weight):
    torch.manual_seed(0)
    student = _Linear()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.layer.weight.add_(torch.randn_like(teacher.layer.weight))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    distill = Distillation(temperature=temperature, weight=weight)
    distill.keep_teacher(teacher)
    distill.patch(student, BatchContract())
    loss = student.training_step((x, y), 0)
    loss.backward()
    with torch.no_grad():  # dL/dlogits: (1-w)(softmax(s) - onehot)/B + w T (softmax(s/T) - softmax(t/T))/B
        s, t = student(x), teacher(x)
        ce = F.softmax(s, -1) - F.one_hot(y, 3).float()
        kd = temperature * (F.softmax(s / temperature, -1) - F.softmax(t / temperature, -1))
        dlogits = ((1 - weight) * ce + weight * kd) / len(x)
        assert torch.allclose(student.layer.weight.grad, dlogits.T @ x, atol=1e-6)
        assert torch.allclose(student.layer.bias.grad, dlogits.sum(0), atol=1e-6)
    assert all(p.grad is None for p in distill.teacher.parameters())  # the teacher is frozen
    distill.unpatch()
    assert "training_step" not in student.__dict__


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": "2"}, {"weight": 0.0}, {"weight": 1.5}])
def test_bad_distillation_arguments_fail_early(kwargs):
    with pytest.raises(ValueError, match="temperature|weight"):
        Distillation(**kwargs)


def test_pruned_bert_recovers_with_the_dense_teacher(tmp_path):
    module, dm = build("bert")
    cb = ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=0, measure_latency=False,
                            evaluate=False, distill={"temperature": 2.0, "weight": 0.5})  # fmt: skip
    make_trainer(tmp_path, [cb], max_epochs=2).fit(module, dm)
    report = cb.report()
    teacher = cb.distill.teacher.model
    assert teacher.config.num_attention_heads == 2 and teacher.config.hidden_size == 32  # the dense model
    assert module.model.config.num_attention_heads == 1
    # the step of the pruning batch ran before the teacher existed; every later batch is distilled
    assert report["distillation"]["steps"] == 2 * 6 - 1 and report["distillation"]["last_loss"] > 0
    assert "training_step" not in module.__dict__
