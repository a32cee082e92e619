"""PT2E QAT on a ResNet-18 (BatchNorm, residual adds, one ReLU module called twice per block): issue #18, item 2."""

import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_trust.compression import QuantizationAwareTraining, load_int8_model, quantize_prepare
from lightning_trust.compression.export import split_reused_modules
from tests.support import trainer as make_trainer


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU, conv-BN, the shortcut added, then the same ReLU again."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(pl.LightningModule):
    """ResNet-18 (2-2-2-2 BasicBlocks) for small images: a 3x3 stem without max-pooling."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], width
        for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for index in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def test_the_reused_relu_is_what_torchao_refuses_and_each_call_gets_its_partition():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    model = ResNet18().train()
    x = torch.rand(4, 1, 8, 8)
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    with pytest.raises(ValueError, match="Input partition has more than one output node"):
        prepare_qat_pt2e(torch.export.export(model, (x,)).module(), quantizer)  # the raw path
    exported = torch.export.export(model, (x,)).module()
    assert split_reused_modules(exported) == 8  # the second relu call of each of the 8 blocks
    prepared = quantize_prepare(model, x)
    assert prepared(x).shape == (4, 10)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, digits):
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("resnet")
    model = ResNet18()
    qat = QuantizationAwareTraining(start_epoch=1, freeze_observers_epoch=2, freeze_bn_epoch=2, compile=True,
                                    export_path=str(root / "resnet18_int8.pt2"))  # fmt: skip
    make_trainer(root, [qat], max_epochs=3, limit_train_batches=12, limit_val_batches=6).fit(model, digits)
    return model, qat, root


@pytest.mark.slow
def test_resnet18_trains_through_qat_and_its_int8_reloads_in_a_fresh_process(fitted, digits):
    model, qat, root = fitted
    report = qat.report()
    assert report["active"] and report["int8_deterministic"] is True and report["size_ratio"] > 3.5, report
    assert report["accuracy_int8"] > 0.8 and report["agreement"] >= 0.99, report  # the whole validation set
    images = torch.cat([x for x, _ in list(digits.val_dataloader())[:6]])
    model.eval()
    with torch.no_grad():
        fake_quant = model(images).argmax(-1)
    torch.save(images, root / "images.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from lightning_trust.compression import load_int8_model
        model = load_int8_model({str(root / "resnet18_int8.pt2")!r})
        with torch.no_grad():
            torch.save(model(torch.load({str(root / "images.pt")!r})).argmax(-1), {str(root / "preds.pt")!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    int8 = torch.load(root / "preds.pt")
    # On 270 images x86 int8 kernels that round differently by CPU (VNNI, AVX2) may flip a few near ties
    assert len(int8) == len(images) and (int8 == fake_quant).float().mean() >= 0.97
    assert torch.equal(load_int8_model(qat.export_file)(images).argmax(-1), int8)  # the reload is exact


@pytest.mark.slow
def test_resnet18_int8_latency_is_measured_at_batch_32_on_one_thread(fitted):
    report = fitted[1].report()
    assert report["latency_batch_size"] == 32 and report["latency_threads"] == 1 and report["int8_compiled"] is True
    assert report["latency_fp32_ms"] > 0 and report["latency_int8_ms"] > 0
    assert report["speedup"] == pytest.approx(report["latency_fp32_ms"] / report["latency_int8_ms"])
    assert report["int8_pays_off"] is (report["speedup"] > 1.0)
    print(f"ResNet-18 (width 16, 1x8x8) int8 speedup at batch 32, 1 thread: {report['speedup']:.2f}x")
