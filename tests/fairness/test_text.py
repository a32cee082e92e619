"""FairnessMetrics on the text demo (a tiny Hugging Face BERT on Adult sentences) equals fairlearn's
MetricFrame exactly, on every side column and an intersection."""

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import MetricFrame

from lightning_trust.demo import AdultTextDataModule
from lightning_trust.demo.foundation import TinyTextTransformer
from lightning_trust.fairness import METRICS, SUMMARIES, FairnessMetrics
from tests.fairness.test_metrics import FAIRLEARN_SUMMARIES
from tests.support import trainer

ENTRIES = ["sex", "race", "age_group", "native_region", ["sex", "race"]]


@pytest.mark.slow
def test_text_demo_equals_metricframe(tmp_path):
    dm = AdultTextDataModule(batch_size=512)
    torch.manual_seed(0)
    module = TinyTextTransformer(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    dm.setup("validate")
    # the predictions by hand: positive-class probability >= a threshold that splits them
    module.eval()
    y_true, scores, sides = [], [], {c: [] for c in ("sex", "race", "age_group", "native_region")}
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores.append(torch.softmax(logits, 1)[:, 1])
            y_true.append(batch["labels"])
            for c in sides:
                sides[c].append(batch[c])
    threshold = float(torch.cat(scores).quantile(0.7))
    y_pred = [(s >= threshold).long() for s in scores]
    cb = FairnessMetrics(ENTRIES, metrics=list(METRICS), min_group_size=0, n_boot=10, threshold=threshold)
    trainer(tmp_path, callbacks=[cb]).validate(module, dm, verbose=False)
    r = cb.report()
    y_true, y_pred = torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()
    named = {c: np.array(dm.categories[c], dtype=object)[torch.cat(v).numpy()] for c, v in sides.items()}
    assert r["num_samples"] == len(y_true) == 3016
    assert 0 < y_pred.mean() < 1  # not a constant predictor
    for entry in ENTRIES:
        columns = [entry] if isinstance(entry, str) else entry
        name = "*".join(columns)
        sf = pd.DataFrame({c: named[c] for c in columns}) if len(columns) > 1 else pd.Series(named[entry], name=entry)
        frame = MetricFrame(metrics=METRICS, y_true=y_true, y_pred=y_pred, sensitive_features=sf)
        assert len(r["by_group"][name]) == len(frame.by_group)
        for key, row in frame.by_group.iterrows():
            label = ",".join(key) if isinstance(key, tuple) else key
            for metric, value in row.items():
                assert r["by_group"][name][label][metric] == value, (name, label, metric)
        for summary, fn in FAIRLEARN_SUMMARIES.items():
            assert r["by_feature"][name][summary] == fn(y_true, y_pred, sensitive_features=sf), (name, summary)
        for metric, value in frame.overall.items():
            assert r["overall"][metric] == value
    for summary in SUMMARIES:
        lo, hi = r["by_feature"]["sex"][f"{summary}_ci"]
        assert lo <= hi
