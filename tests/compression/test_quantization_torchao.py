"""QuantizationAwareTraining through torchao's quantize_ (QATConfig prepare/convert) on Linear-heavy
models: the tiny HF BERT, ViT and PEFT LoRA BERT of the matrix."""

import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_trust.compression import QuantizationAwareTraining
from lightning_trust.compression.qat_torchao import float_reference, linear_mac_share, torchao_configs
from lightning_trust.demo import SmallCNN
from tests.compression.resume_runs import run
from tests.foundation.models import build
from tests.support import trainer as make_trainer


@pytest.mark.parametrize(
    "kwargs, match",
    [({"backend": "onnx"}, "`backend` must be one of"), ({"torchao_scheme": "int4"}, "`torchao_scheme`"),
     ({"group_size": 0}, "`group_size`"), ({"backend": "torchao", "freeze_bn_epoch": 1}, "no effect with backend='torchao'")],
)  # fmt: skip
def test_bad_backend_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_auto_measures_the_linear_share_of_the_macs():
    bert, _ = build("bert")
    ids = torch.randint(3, 64, (2, 10))
    assert linear_mac_share(bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) == 1.0
    # SmallCNN by hand: conv1 8x8x8 out * 9, conv2 16x4x4 * 72, classifier 10 * 64 (Linear)
    cnn = SmallCNN()
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in cnn.modules() if isinstance(m, nn.Linear)]
    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: sizes.__setitem__(mod, o.numel())) for m in convs + linears]
    cnn.eval()(torch.zeros(1, 1, 8, 8))
    [h.remove() for h in hooks]
    conv = sum(sizes[m] * m.weight[0].numel() for m in convs)
    lin = sum(sizes[m] * m.in_features for m in linears)
    assert linear_mac_share(cnn, torch.zeros(1, 1, 8, 8)) == pytest.approx(lin / (lin + conv)) and lin < conv


@pytest.mark.slow
def test_bert_trains_fake_quantized_and_its_int8_program_reloads_in_a_fresh_process(tmp_path):
    from torchao.quantization import quantize_
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    module, dm = build("bert")
    weights = {n: p for n, p in module.named_parameters()}
    seen = []

    class _Spy(pl.Callback):  # the layer type the training step ran through
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, type(pl_module.model.bert.encoder.layer[0].output.dense).__name__))

    cb = QuantizationAwareTraining(start_epoch=1, backend="auto", compile=False, latency_batch_size=8)
    trainer = make_trainer(tmp_path, [cb, _Spy()], max_epochs=2, limit_train_batches=3)
    trainer.fit(module, dm)
    assert cb.backend_used == "torchao" and cb.linear_mac_share == 1.0
    assert seen == [(0, "Linear")] * 3 + [(1, "FakeQuantizedLinear")] * 3
    # the swap kept every Parameter object: the optimizer trained the fake-quantized layers' weights
    assert all(p is weights[n] for n, p in module.named_parameters())
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.parameters()} <= optimized
    assert isinstance(module.model.classifier, FakeQuantizedLinear)  # left fake-quantized, never half-converted
    report = cb.report()
    assert report["torchao_scheme"] == "int8" and report["int8_deterministic"] is True
    assert report["agreement"] >= 0.95 and report["int8_weight_share"] > 0.5, report
    assert report["int8_pays_off"] == (report["speedup"] > 1.0) and report["latency_int8_ms"] > 0
    assert report["size_int8_bytes"] < report["size_fp32_bytes"]
    # the reference library: torchao's own prepare/convert of the trained float weights gives the same logits
    raw = float_reference(module)
    quantize_(raw, torchao_configs("int8")[0])
    quantize_(raw, torchao_configs("int8")[1])
    ids = torch.randint(3, 64, (5, 10))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = raw(**x).logits
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        from lightning_trust.compression import load_int8_model
        model = load_int8_model({report['export_path']!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        with torch.no_grad():
            torch.save([model(x["input_ids"], x["attention_mask"]).logits for _ in range(2)], {str(tmp_path / 'out.pt')!r})
    """)  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    first, second = torch.load(tmp_path / "out.pt")
    assert torch.equal(first, second)  # deterministic after a reload
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_vit_int4_weights_and_a_group_size_that_does_not_fit_is_refused_before_training(tmp_path):
    module, dm = build("vit")
    with pytest.raises(ValueError, match=r"group_size=64.*'model\.vit.*in_features=32.*Set `group_size`"):
        make_trainer(tmp_path, [QuantizationAwareTraining(backend="torchao", torchao_scheme="int8_int4", group_size=64)],
                     max_epochs=1).fit(module, dm)  # fmt: skip
    assert "forward" not in module.__dict__ and type(module.model.classifier) is nn.Linear  # untouched
    cb = QuantizationAwareTraining(start_epoch=0, backend="torchao", torchao_scheme="int8_int4", compile=False,
                                   measure_latency=False)  # fmt: skip
    make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=2).fit(module, dm)
    report = cb.report()
    assert report["int8_deterministic"] and report["agreement"] >= 0.9 and report["int8_weight_share"] > 0.5, report
    program = torch.export.load(report["export_path"])
    int8 = [t for t in program.state_dict.values() if t.dtype == torch.int8]
    assert int8 and all(int(t.min()) >= -8 and int(t.max()) <= 7 for t in int8)  # int4 values in int8 storage


@pytest.mark.slow
def test_peft_lora_bert_quantizes_its_base_and_adapter_layers(tmp_path):
    module, dm = build("bert_lora")
    cb = QuantizationAwareTraining(start_epoch=0, backend="auto", compile=False, measure_latency=False)
    make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module, dm)
    names = cb._torchao_layers
    assert any(n.endswith("query.base_layer") for n in names) and any("lora_A" in n for n in names)
    report = cb.report()
    assert report["int8_deterministic"] and report["agreement"] >= 0.9, report


@pytest.mark.slow
def test_kill_and_resume_during_qat_ends_like_an_uninterrupted_run(tmp_path):
    def qat():
        return QuantizationAwareTraining(start_epoch=1, backend="torchao", compile=False, measure_latency=False)

    full, full_cb = run(tmp_path, "full", qat)
    # the run is deterministic, so the uninterrupted run's checkpoint after the first fake-quantized epoch is the
    # one a run killed later in epoch 2 would have left
    resumed, resumed_cb = run(tmp_path, "resumed", qat, ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    assert resumed_cb.active and resumed_cb._torchao_layers == full_cb._torchao_layers
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    keys = ("accuracy_int8", "accuracy_fake_quant", "agreement", "size_int8_bytes")
    assert {k: resumed_cb.report()[k] for k in keys} == {k: full_cb.report()[k] for k in keys}
