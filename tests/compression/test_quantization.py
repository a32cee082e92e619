import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_trust.compression import (
    ProgressivePruning,
    QuantizationAwareTraining,
    load_pruned_checkpoint,
    quantize_prepare,
)
from lightning_trust.compression.export import QAT_ATTR, set_batchnorm_training
from lightning_trust.compression.qat_graph import freeze_graph_batchnorm
from lightning_trust.demo import SmallCNN, TabularMLP
from tests.support import trainer as make_trainer


@pytest.mark.parametrize(
    "kwargs, match",
    [({"start_epoch": -1}, "start_epoch"), ({"start_epoch": 2, "freeze_bn_epoch": 1}, "freeze_bn_epoch"),
     ({"export_path": "model.pt"}, "pt2")],
)  # fmt: skip
def test_bad_arguments_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(**kwargs)


class _NoLayers(pl.LightningModule):
    def forward(self, x):
        return x * 2


class _Branchy(SmallCNN):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()

    def forward(self, x):
        return self.classifier(self.gate(self.features(x)))


class _Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: not exportable
            return x
        return -x


def test_refuses_models_it_cannot_quantize_naming_the_module_and_leaves_them_untouched(tmp_path, digits):
    with pytest.raises(ValueError, match="nothing to quantize in _NoLayers"):
        quantize_prepare(_NoLayers(), torch.zeros(2, 3))
    model = _Branchy()
    batches = []

    class _Batches(pl.Callback):
        def on_train_batch_start(self, *args):
            batches.append(1)

    # refused at setup (a trial export on a copy with the first batch), not at the first batch of start_epoch
    with pytest.raises(RuntimeError, match=r"cannot quantize _Branchy.*'gate' \(_Gate\).*Remove the branch"):
        make_trainer(tmp_path, [QuantizationAwareTraining(start_epoch=1), _Batches()], max_epochs=2).fit(model, digits)
    assert batches == [] and not hasattr(model, QAT_ATTR) and "forward" not in model.__dict__


def test_qat_must_start_after_pruning_ends(tmp_path, digits):
    callbacks = [ProgressivePruning(start_epoch=1, end_epoch=2), QuantizationAwareTraining(start_epoch=2)]
    with pytest.raises(ValueError, match="starts before pruning ends"):
        make_trainer(tmp_path, callbacks, max_epochs=4).fit(SmallCNN(), digits)
    callbacks = [QuantizationAwareTraining(start_epoch=3), ProgressivePruning(start_epoch=1, end_epoch=2)]
    with pytest.raises(ValueError, match="Put ProgressivePruning before"):
        make_trainer(tmp_path, callbacks, max_epochs=4).fit(SmallCNN(), digits)


def test_fast_dev_run_smoke_tests_a_config_whose_schedules_start_later(tmp_path, digits):
    # a schedule past max_epochs is refused in a real fit, but fast_dev_run (max_epochs=1) is a smoke test
    callbacks = [ProgressivePruning(start_epoch=1, end_epoch=2), QuantizationAwareTraining(start_epoch=3)]
    model = SmallCNN()
    before = [p.shape for p in model.parameters()]
    pl.Trainer(
        fast_dev_run=True,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, digits)
    assert [p.shape for p in model.parameters()] == before and not callbacks[1].active
    with pytest.raises(ValueError, match="never starts with max_epochs=1"):
        make_trainer(tmp_path, [QuantizationAwareTraining(start_epoch=3)], max_epochs=1).fit(SmallCNN(), digits)


def test_batchnorm_freeze_survives_train_mode():
    model = SmallCNN(batch_norm=True)
    prepared = quantize_prepare(model, torch.rand(4, 1, 8, 8))
    assert freeze_graph_batchnorm(prepared) and not freeze_graph_batchnorm(prepared)  # idempotent
    prepared.train()  # Lightning's .train() after validation: BatchNorm stays frozen
    assert not set_batchnorm_training(prepared, False)
    mean = model.features[1].running_mean.clone()
    prepared(torch.rand(8, 1, 8, 8))
    assert torch.equal(model.features[1].running_mean, mean)  # the module's own buffer: no longer updated


@pytest.mark.slow
def test_exported_int8_model_loads_in_a_fresh_process_and_agrees_with_fake_quant(tmp_path, digits):
    pl.seed_everything(0)
    model = SmallCNN(batch_norm=True)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_observers_epoch=3, freeze_bn_epoch=3, compile=False,
                                    export_path=str(tmp_path / "digits_int8.pt2"))  # fmt: skip
    make_trainer(tmp_path, [qat], max_epochs=4).fit(model, digits)
    report = qat.report()
    assert report["active"] and report["export_path"] == str(tmp_path / "digits_int8.pt2")
    assert report["size_ratio"] > 3.5 and report["size_int8_bytes"] < report["size_fp32_bytes"]
    assert report["agreement"] >= 0.99 and report["accuracy_int8"] > 0.85
    assert abs(report["accuracy_int8"] - report["accuracy_fake_quant"]) <= 0.01
    assert (tmp_path / "lightning_trust" / "quantization" / "int8_vs_fp32.png").exists()

    images = digits.val_dataset.tensors[0]
    with torch.no_grad():
        fake_quant = model.eval()(images).argmax(-1)  # the module still runs fake-quantized (float weights)
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from lightning_trust.compression import load_int8_model
        model = load_int8_model({str(tmp_path / "digits_int8.pt2")!r})
        images = torch.load({str(tmp_path / "images.pt")!r})
        torch.save(model(images).argmax(-1), {str(tmp_path / "int8_preds.pt")!r})
        print(sorted({{str(v.dtype) for v in model.state_dict().values()}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.int8" in done.stdout
    int8 = torch.load(tmp_path / "int8_preds.pt")
    assert len(int8) == len(images) and (int8 == fake_quant).float().mean() >= 0.99


@pytest.mark.slow
def test_pruning_then_qat_chained_in_one_trainer_and_resumed_from_a_qat_checkpoint(tmp_path, digits):
    pl.seed_everything(0)
    model = SmallCNN()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")

    def callbacks():
        return [ProgressivePruning(pruning_ratio=0.5, start_epoch=0, end_epoch=1, measure_latency=False),
                QuantizationAwareTraining(start_epoch=2, compile=False, measure_latency=False)]  # fmt: skip

    trainer = make_trainer(
        tmp_path, callbacks() + [checkpoint], max_epochs=4, enable_checkpointing=True, limit_train_batches=6
    )
    trainer.fit(model, digits)
    pruning, qat = trainer.callbacks[0].report(), trainer.callbacks[1].report()
    assert pruning["params_after"] < 0.5 * pruning["params_before"]
    assert qat["active"] and qat["agreement"] >= 0.99
    assert qat["size_ratio"] > 3.5
    # the pruning report measured the pruned float model, not the fake-quant graph chained after it
    assert pruning["macs_after"] > 0

    # resume from the epoch-2 checkpoint (pruned and fake-quantized): structure and observers rebuilt first
    fresh = SmallCNN()
    resumed = make_trainer(tmp_path, callbacks(), max_epochs=4, limit_train_batches=6)
    resumed.fit(fresh, digits, ckpt_path=str(tmp_path / "epoch=2.ckpt"))
    assert hasattr(fresh, QAT_ATTR) and fresh.features[0].out_channels == model.features[0].out_channels
    assert resumed.callbacks[1].report()["agreement"] >= 0.99
    tested = make_trainer(tmp_path, callbacks(), max_epochs=1).test(
        SmallCNN(), digits, ckpt_path=str(tmp_path / "epoch=3.ckpt"), verbose=False
    )
    assert tested[0]["test/acc"] > 0.8
    # outside Lightning, the float pruned model loads from a QAT-stage checkpoint (fake-quant state left out)
    float_model = load_pruned_checkpoint(SmallCNN, tmp_path / "epoch=3.ckpt")
    assert not hasattr(float_model, QAT_ATTR) and float_model.features[0].out_channels == model.features[0].out_channels


@pytest.mark.slow
def test_compiled_int8_latency_is_measured(tmp_path, adult):
    pl.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=0, compile=True)
    make_trainer(tmp_path, [qat], max_epochs=1, limit_train_batches=10, limit_val_batches=4).fit(TabularMLP(), adult)
    report = qat.report()
    assert report["int8_compiled"] is True and report["latency_int8_ms"] > 0 and report["speedup"] > 0
    assert report["agreement"] >= 0.99
