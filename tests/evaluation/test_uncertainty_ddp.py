"""Under DDP (2 CPU processes, uneven validation and test shards) ``UncertaintyEvaluation`` reports
the numbers of one process on the same data: coverage, set sizes, quantiles, temperature,
calibration before and after, and the shift tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_trust.demo.data import DictDataset
from lightning_trust.evaluation.uncertainty import UncertaintyEvaluation
from tests.ddp_harness import run_ddp

REPO = str(Path(__file__).resolve().parents[2])
CATEGORIES = {"sex": ["Female", "Male"], "race": ["A", "B", "C"]}


def _data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    sex, race = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    race[n // 2 :] = race[n // 2 :] % 2  # race C only in the first half: rank 1 validates none of it
    x = torch.randn(n, 4, generator=g) + 1.2 * F.pad(F.one_hot(y, 3).float(), (0, 1)) + 0.4 * race[:, None]
    return {"x": x, "y": y, "sex": sex, "race": race}


class FrozenMLP(pl.LightningModule):
    """A tiny 3-class MLP trained at learning rate 0: DDP and one process hold the same weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 3.0  # overconfident: the temperature has work to do

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch["x"])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self(batch["x"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class ShardedData(pl.LightningDataModule):
    """Every process trains on all 256 rows; validation (517 rows: 300 | 217) and test (400 rows:
    150 | 250) are split unevenly by rank when ``shards`` is 2."""

    categories = CATEGORIES
    batch_keys = {"input": "x", "target": "y"}

    def __init__(self, shards: int, rank: int = 0) -> None:
        super().__init__()
        self.shards, self.rank = shards, rank
        self.train, self.val, self.test = _data(256, 1), _data(517, 2), _data(400, 3)

    def _part(self, data: dict[str, torch.Tensor], cut: int) -> DictDataset:
        rows = slice(None) if self.shards == 1 else (slice(0, cut) if self.rank == 0 else slice(cut, None))
        return DictDataset({k: v[rows] for k, v in data.items()})

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(self.train), batch_size=64)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._part(self.val, 300), batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._part(self.test, 150), batch_size=64)


def callback() -> UncertaintyEvaluation:
    return UncertaintyEvaluation(sensitive_features=["sex"], domain_key="race", mondrian="sex",
                                 include_last_label="randomized", conformal_on="calibrated",
                                 shift_tests=["mmd", "ks"], shift_samples=60, n_permutations=99,
                                 min_cell_samples=5, figures="never", seed=3)  # fmt: skip


def run(devices: int, root: str) -> dict[str, Any]:
    """Fit one epoch (weights unchanged), then test; both passes' results."""
    rank = int(__import__("os").environ.get("LOCAL_RANK", "0"))
    cb = callback()
    trainer = pl.Trainer(strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_epochs=1,
                         limit_train_batches=2, num_sanity_val_steps=0, use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, callbacks=[cb])  # fmt: skip
    model, data = FrozenMLP(), ShardedData(devices, rank)
    trainer.fit(model, data)
    validate = cb.results["validate"]
    trainer.test(model, data)
    return {"validate": validate, "test": cb.results["test"]}


BODY = f"""
sys.path.insert(0, {REPO!r})
from tests.evaluation.test_uncertainty_ddp import run
save_result(run(2, str(OUT)))
"""


def _close(a: Any, b: Any, path: str = "") -> None:
    """Equal structure; floats within 1e-6 (the float sums of another batching), the rest exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_uneven_shards_equal_one_process(tmp_path):
    ranks = run_ddp(BODY, tmp_path)
    single = run(1, str(tmp_path / "single"))
    import json

    single = json.loads(json.dumps(single))  # the JSON round trip the ranks' results took
    for stage in ("validate", "test"):
        one, zero, first = single[stage], ranks[0][stage], ranks[1][stage]
        for r in (zero, first):
            _close(r["conformal"], one["conformal"], f"{stage}.conformal")
            _close(r["calibration"], one["calibration"], f"{stage}.calibration")
            _close(r["shift"], one["shift"], f"{stage}.shift")
            assert r["seen_samples"] == one["seen_samples"] and r["evaluation_samples"] == one["evaluation_samples"]
        # the exact numbers: counts and sets agree sample for sample, the permutation p-values exactly
        for score, values in one["conformal"]["scores"].items():
            assert zero["conformal"]["scores"][score]["cells"] == values["cells"], (stage, score)
        for domain, tests in one["shift"]["domains"].items():
            assert zero["shift"]["domains"][domain]["mmd"]["p_value"] == tests["mmd"]["p_value"]
    test = single["test"]
    assert test["seen_samples"] == 400 and sorted(test["conformal"]["scores"]) == ["aps", "lac", "raps"]
    assert test["conformal"]["scores"]["lac"]["cells"]["race=C"]["samples"] > 0  # a domain only rank 0 holds
    assert test["calibration"]["temperature"] > 1 and test["shift"]["tested"]
