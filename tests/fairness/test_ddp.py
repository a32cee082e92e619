from pathlib import Path

import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    equalized_odds_ratio,
)

from lightning_trust.fairness import METRICS, ThresholdOptimizer
from tests.ddp_harness import run_ddp
from tests.fairness.helpers import binary_arrays, names, synthetic

REPO = str(Path(__file__).resolve().parents[2])
SPLIT = 300  # rank 0 validates rows [0, 300), rank 1 rows [300, 517): uneven sizes and batch counts

BODY = f"""
sys.path.insert(0, {REPO!r})
from torch.utils.data import DataLoader
from lightning_trust.demo.data import DictDataset
from lightning_trust.fairness import FairnessMetrics, FairnessPenalty, ThresholdOptimizer
from tests.fairness.helpers import LogitModule, synthetic, CATEGORIES

class RankData(pl.LightningDataModule):
    categories = CATEGORIES
    def __init__(self):
        super().__init__()
        self.data = synthetic()
    def _part(self):
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        rows = slice(0, {SPLIT}) if rank == 0 else slice({SPLIT}, None)
        return DictDataset({{k: v[rows] for k, v in self.data.items()}})
    def train_dataloader(self):
        return DataLoader(self._part(), batch_size=64)
    def val_dataloader(self):
        return DataLoader(self._part(), batch_size=64)

metrics = FairnessMetrics(sensitive_features=["sex", ["sex", "race"]], metrics={list(METRICS)!r}, min_group_size=0,
                          n_boot=8)
optimizer = ThresholdOptimizer("sex", constraint="demographic_parity", name="fairness_thresholds")
penalty = FairnessPenalty("sex", lam=0.5)  # the patched training_step runs under DDP's forward redirection
trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=3,
                     callbacks=[metrics, optimizer, penalty],
                     use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
module = LogitModule()
trainer.fit(module, RankData())
r = metrics.report()
counts, replicates = metrics._collector.counts.compute()
save_result({{"by_group": r["by_group"], "by_feature": r["by_feature"], "num_samples": r["num_samples"],
             "state_bytes": r["state_bytes"], "replicate_rows": replicates[:, :-1].sum(1).tolist(),
             "thresholds": optimizer.thresholds, "scale": float(module.scale), "penalty_steps": penalty.steps}})
"""


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_uneven_batches_equal_metricframe(tmp_path):
    results = run_ddp(BODY, tmp_path)
    data = synthetic()
    # the model trained (with the penalty); validation used the trained scale
    scale = results[0]["scale"]
    assert results[1]["scale"] == scale
    data = {**data, "x": data["x"] * scale}
    y_true, y_pred = binary_arrays(data)
    sex = names(data, "sex")
    sf = pd.DataFrame({"sex": sex, "race": names(data, "race")})
    for r in results:
        assert r["num_samples"] == 517
        # the tables summed over the ranks (all_reduce "sum"), of a size set by the groups alone
        assert r["state_bytes"] == ((2 + 6) * 4 + 1) * 8 * 9
        # each replicate adds every sample of both ranks once per entry, with a Poisson(1) weight
        assert all(abs(rows / (2 * 517) - 1) < 0.15 for rows in r["replicate_rows"])
        frame = MetricFrame(metrics=METRICS, y_true=y_true, y_pred=y_pred, sensitive_features=sf)
        for (s, race), row in frame.by_group.iterrows():
            for metric, value in row.items():
                assert r["by_group"]["sex*race"][f"{s},{race}"][metric] == pytest.approx(value, abs=0, rel=0)
        assert r["by_feature"]["sex"]["demographic_parity_difference"] == demographic_parity_difference(
            y_true, y_pred, sensitive_features=sex
        )
        assert r["by_feature"]["sex*race"]["equalized_odds_difference"] == equalized_odds_difference(
            y_true, y_pred, sensitive_features=sf
        )
        assert r["by_feature"]["sex*race"]["equalized_odds_ratio"] == equalized_odds_ratio(
            y_true, y_pred, sensitive_features=sf
        )
        assert r["penalty_steps"] == 3
    assert results[0]["replicate_rows"] == results[1]["replicate_rows"]
    # ThresholdOptimizer fitted on the gathered scores of both ranks: the same on each, equal to fairlearn's
    assert results[0]["thresholds"] == results[1]["thresholds"]
    import torch

    reference = ThresholdOptimizer("sex")
    scores = torch.softmax(data["x"].float(), 1)[:, 1].numpy()
    reference.fit_arrays(scores, y_true, sex)
    assert results[0]["thresholds"] == reference.thresholds
