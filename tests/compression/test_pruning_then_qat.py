"""Pruning then quantization-aware training chained in one fit on the tiny BERT and ViT (item 6 of issue #18):
heads and MLP width pruned first, then QAT on the pruned structure, exported int8 that reloads."""

import pytest
import torch

from lightning_trust.compression import ProgressivePruning, QuantizationAwareTraining, load_int8_model
from lightning_trust.compression.export import plain_forward
from lightning_trust.core.batch import logits_of
from tests.foundation.models import build
from tests.support import trainer as make_trainer


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_prune_heads_then_qat_exports_the_pruned_int8_model(tmp_path, name):
    module, dm = build(name)
    pruning = ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=0, measure_latency=False,
                                 evaluate=False)  # fmt: skip
    qat = QuantizationAwareTraining(start_epoch=1, compile=False, measure_latency=False,
                                    export_path=str(tmp_path / "int8.pt2"))  # fmt: skip
    make_trainer(tmp_path, [pruning, qat], max_epochs=2).fit(module, dm)
    report, q = pruning.report(), qat.report()
    assert report["heads_after"] == [1, 1] and report["hidden_after"] == [16, 16], report
    assert q["active"] and q["start_epoch"] == 1, q
    assert q["size_int8_bytes"] < q["size_fp32_bytes"] and q["agreement"] >= 0.9, q
    int8 = load_int8_model(q["export_path"])
    batch = next(iter(dm.val_dataloader()))
    keys = ("pixel_values",) if name == "vit" else ("input_ids", "attention_mask")
    inputs = {k: batch[k] for k in keys}
    with torch.no_grad(), plain_forward(module):
        out = qat.call_for_batch(batch).invoke(int8)  # the module's own call signature (keyword inputs)
        fp32 = module.model.eval()(**inputs).logits
    logits = logits_of(out)
    assert logits.shape == fp32.shape == (len(batch["labels"]), 2)
    assert (logits.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9
