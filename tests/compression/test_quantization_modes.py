"""QAT really switches to eval: validation, BatchNorm freezing, the exported int8 program (issue #18, item 1)."""

import copy
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_trust.compression import QuantizationAwareTraining, load_int8_model, quantize_prepare
from lightning_trust.compression.qat_call import ForwardCall, GraphForward
from lightning_trust.compression.qat_graph import set_graph_mode, training_ops
from tests.support import trainer as make_trainer


class ConvBNDropout(pl.LightningModule):
    """A conv net with BatchNorm (eps and momentum not torch's defaults) and dropout, on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, eps=1e-3, momentum=0.3), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(8 * 64, 10))
        self.val_logits: list[torch.Tensor] = []

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_logits.append(logits.detach().clone())
        self.log("val_loss", F.cross_entropy(logits, y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _bn(model):
    return model.features[1]


def _bn_state(model):
    bn = _bn(model)
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def _observer_state(graph):
    return {k: v.clone() for k, v in graph.state_dict().items() if "activation_post_process" in k}


class _ValidationWatch(Callback):
    """BatchNorm statistics and quantization ranges around every validation run."""

    def __init__(self, qat):
        self.qat, self.changed = qat, []

    def on_validation_start(self, trainer, pl_module):
        self.before = (_bn_state(pl_module), _observer_state(self.qat._prepared) if self.qat.active else {})

    def on_validation_end(self, trainer, pl_module):
        bn, observers = self.before
        now = _observer_state(self.qat._prepared) if self.qat.active else {}
        same_bn = all(torch.equal(a, b) for a, b in zip(bn, _bn_state(pl_module)))
        same_obs = observers.keys() == now.keys() and all(torch.equal(observers[k], now[k]) for k in now)
        self.changed.append(not (same_bn and same_obs))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, digits):
    """QAT from epoch 0, BatchNorm frozen from epoch 1, 2 epochs (the issue's configuration)."""
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("modes")
    model = ConvBNDropout()
    qat = QuantizationAwareTraining(start_epoch=0, freeze_bn_epoch=1, compile=False, measure_latency=False,
                                    export_path=str(root / "int8.pt2"))  # fmt: skip
    watch = _ValidationWatch(qat)
    frozen_at = {}

    class _EpochStart(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            frozen_at[trainer.current_epoch] = _bn_state(pl_module)

    make_trainer(root, [qat, watch, _EpochStart()], max_epochs=2, limit_train_batches=8, limit_val_batches=3).fit(
        model, digits
    )
    return model, qat, watch, frozen_at, root


def test_the_module_forward_follows_every_recompile(fitted):
    model, _qat, *_ = fitted
    assert isinstance(model.__dict__["forward"], GraphForward)
    x = torch.rand(6, 1, 8, 8)
    model.eval()
    with torch.no_grad():  # eval: running statistics, no dropout, so a row does not depend on its batch
        assert torch.equal(model(x)[:2], model(x[:2]))
        assert torch.equal(model(x), model(x))
    clone = copy.deepcopy(model).eval()  # a deep copy drops the graph's installed train/eval: the forward syncs it
    with torch.no_grad():
        assert torch.equal(clone(x), model(x)) and torch.equal(clone(x)[:2], clone(x[:2]))
    model.train()
    with torch.no_grad():  # train: batch statistics and dropout are back, through the same forward
        assert not torch.equal(model(x), model(x))
    model.eval()


def test_validation_runs_in_eval_mode_and_changes_no_statistic(fitted, digits):
    model, qat, watch, *_ = fitted
    assert watch.changed == [False, False]  # BatchNorm statistics and observer ranges untouched by validation
    trainer = make_trainer(None, [qat], limit_val_batches=3)
    model.val_logits.clear()
    trainer.validate(model, digits, verbose=False)
    first = list(model.val_logits)
    model.val_logits.clear()
    trainer.validate(model, digits, verbose=False)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, model.val_logits))  # dropout off


def test_batchnorm_freezing_takes_effect(fitted):
    model, _qat, _watch, frozen_at, _ = fitted
    bn = _bn(model)
    epoch0, epoch1 = frozen_at[0], frozen_at[1]
    assert not torch.equal(epoch0[0], torch.zeros_like(epoch0[0]))  # epoch 0 trained on batch statistics
    assert all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))  # frozen from epoch 1: not one update
    assert torch.equal(bn.running_mean, epoch1[0])


def test_mode_switch_keeps_the_layers_own_values():
    """torchao's move_exported_model_to_train/eval rewrites BN and dropout with p=0.5, eps=1e-5, momentum=0.1."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    model = ConvBNDropout()
    prepared = quantize_prepare(model, torch.rand(4, 1, 8, 8))

    def literals(graph):
        out = []
        for node in graph.graph.nodes:
            if node.target == torch.ops.aten.batch_norm.default:
                out.append(("bn", *node.args[5:8]))
            if node.target == torch.ops.aten.dropout.default:
                out.append(("dropout", *node.args[1:3]))
        return out

    assert literals(prepared) == [("bn", True, 0.3, 1e-3), ("dropout", 0.25, True)]  # torchao's fusion had 0.1, 1e-5
    assert (
        next(n.args[1] for n in prepared.graph.nodes if n.target == torch.ops.aten.add.Tensor) == 1e-3
    )  # sqrt(var+eps)
    prepared.eval()
    assert literals(prepared) == [("bn", False, 0.3, 1e-3), ("dropout", 0.25, False)]
    prepared.train()
    assert literals(prepared) == [("bn", True, 0.3, 1e-3), ("dropout", 0.25, True)]
    raw = quantize_prepare(ConvBNDropout(), torch.rand(4, 1, 8, 8))
    move_exported_model_to_eval(raw)
    move_exported_model_to_train(raw)
    assert literals(raw) == [("bn", True, 0.1, 1e-5), ("dropout", 0.5, True)]  # what this module avoids


def test_attention_dropout_is_off_in_eval_and_back_in_training():
    from tests.foundation.models import build

    module, dm = build("bert")
    batch = next(iter(dm.train_dataloader()))
    call = ForwardCall.from_inputs(module, {k: batch[k][:4] for k in ("input_ids", "attention_mask")})
    prepared = quantize_prepare(module, call)
    sdpa = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2 and training_ops(prepared)  # exported in training mode: dropout_p=0.1 in the graph
    prepared.eval()
    assert training_ops(prepared) == []
    with torch.no_grad():
        assert torch.equal(call.invoke(prepared).logits, call.invoke(prepared).logits)
    prepared.train()
    assert {n.args[4] if len(n.args) > 4 else n.kwargs["dropout_p"] for n in sdpa} == {0.1}
    assert set_graph_mode(prepared, training=False) and not set_graph_mode(prepared, training=False)


def _fresh_process_outputs(program, inputs, out, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        from lightning_trust.compression import load_int8_model
        from lightning_trust.compression.qat_graph import training_ops
        model = load_int8_model({str(program)!r})
        assert training_ops(model) == [], training_ops(model)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            output = model(*inputs)
        torch.save(getattr(output, "logits", output), {str(out)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def _in_process(program, inputs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_int8_model(program)
        with torch.no_grad():
            first, second = model(*inputs), model(*inputs)
    finally:
        torch.set_num_threads(threads)
    return getattr(first, "logits", first), getattr(second, "logits", second)


@pytest.mark.slow
def test_conv_int8_program_is_deterministic_also_in_a_fresh_process(fitted, tmp_path):
    _, qat, _, _, _root = fitted
    program = torch.export.load(qat.export_file)
    assert training_ops(program.graph_module) == [] and not program.graph_signature.buffers_to_mutate
    inputs = (torch.rand(16, 1, 8, 8),)
    first, second = _in_process(qat.export_file, inputs)
    assert torch.equal(first, second) and qat.report()["int8_deterministic"] is True
    assert torch.equal(_fresh_process_outputs(qat.export_file, inputs, tmp_path / "out.pt", tmp_path), first)


@pytest.mark.slow
def test_bert_qat_called_with_keywords_exports_a_deterministic_int8_program(tmp_path):
    from tests.foundation.models import build

    module, dm = build("bert")  # training_step calls self(input_ids, attention_mask=...)
    before = module.model.classifier.weight.detach().clone()
    qat = QuantizationAwareTraining(start_epoch=0, compile=False, measure_latency=False,
                                    export_path=str(tmp_path / "bert_int8.pt2"))  # fmt: skip
    make_trainer(tmp_path, [qat], max_epochs=1, limit_train_batches=3, limit_val_batches=2).fit(module, dm)
    assert not torch.equal(module.model.classifier.weight, before)  # trained through the fake-quant graph
    report = qat.report()
    assert report["int8_deterministic"] is True and report["agreement"] >= 0.95
    batch = next(iter(dm.val_dataloader()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():  # the module's own signature, by keyword and positionally, in eval mode
        module.eval()
        by_keyword, positional = module(**inputs).logits, module(inputs["input_ids"], inputs["attention_mask"]).logits
    assert torch.equal(by_keyword, positional)
    with pytest.raises(
        TypeError, match=r"called with \['input_ids', 'attention_mask'\]; this call passes \['input_ids'\]"
    ):
        module(inputs["input_ids"])
    first, second = _in_process(qat.export_file, (inputs["input_ids"], inputs["attention_mask"]))
    assert torch.equal(first, second)
    inputs = (inputs["input_ids"], inputs["attention_mask"])  # the int8 program takes the forward's order
    assert torch.equal(_fresh_process_outputs(qat.export_file, inputs, tmp_path / "out.pt", tmp_path), first)
    assert (first.argmax(-1) == by_keyword.argmax(-1)).float().mean() >= 0.9


def test_training_after_validation_is_training_again():
    """Lightning restores the modes after validation by setting ``.training`` (``_ModuleMode.restore``), not
    by calling ``.train()``: the routed forward brings the graph back to training behaviour itself."""
    from lightning.pytorch.utilities.model_helpers import _ModuleMode

    model = ConvBNDropout()
    call = ForwardCall.from_inputs(model, torch.rand(4, 1, 8, 8))
    graph = quantize_prepare(model, call)
    forward = GraphForward(model, graph, call)
    modes = _ModuleMode()
    model.add_module("qat", graph)
    modes.capture(model)
    model.eval()
    assert training_ops(graph) == []
    modes.restore(model)  # what Lightning does after validation
    assert graph.training and training_ops(graph) == []  # the nodes are still in eval mode...
    mean = _bn(model).running_mean.clone()
    forward(torch.rand(8, 1, 8, 8))  # ...until the next call
    assert training_ops(graph) and not torch.equal(_bn(model).running_mean, mean)
