"""PrivacyAudit in real runs: memorised canaries give a bound well above 0 without DP; DP runs at
ε = 1 and 8 stay below their accountant's ε, with input canaries through the Poisson loader and
white-box gradient canaries inside the DP optimizer; canaries never reach validation or the card."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_trust.core.seam import train_loader_owner
from lightning_trust.privacy import DifferentialPrivacy, PrivacyAudit
from lightning_trust.privacy.audit_bound import audit
from lightning_trust.privacy.audit_canaries import CanaryDataset
from lightning_trust.report import TrustReport, load_card
from tests.privacy.helpers import TinyModule, trainer

pytestmark = pytest.mark.slow

N, FEATURES, M = 600, 32, 200


def data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


class Data(pl.LightningDataModule):
    """Separable 32-d data: a random-label canary is memorisable, its held-out twin is not."""

    def __init__(self) -> None:
        super().__init__()
        self.train, self.val = data(), data(200, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=100)


class SeenValidation(pl.Callback):
    """The samples every validation batch held."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.rows.append(batch[0])


def _module() -> TinyModule:
    return TinyModule(features=FEATURES, hidden=64, lr=0.05, momentum=0.9)


def _dp(epsilon: float) -> DifferentialPrivacy:
    if math.isinf(epsilon):
        return DifferentialPrivacy(noise_multiplier=0.0, target_delta=1e-3, accountant="rdp")
    return DifferentialPrivacy(target_epsilon=epsilon, target_delta=1e-3, accountant="rdp")


def test_a_non_private_run_with_memorisable_canaries_shows_a_large_epsilon(tmp_path):
    pl.seed_everything(0)
    audit_cb = PrivacyAudit(num_canaries=M, seed=0)
    seen = SeenValidation()
    report = TrustReport(standards={"privacy_audit.epsilon_lower_bound": {"min": 1.0}})
    dm = Data()
    t = trainer(
        tmp_path, callbacks=[audit_cb, seen, report], max_epochs=30, limit_val_batches=None, check_val_every_n_epoch=10
    )
    t.fit(_module(), train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())

    section = audit_cb.report()
    assert set(section) - {"figures"} == set(PrivacyAudit.report_keys)
    included = int(audit_cb.included.sum())
    assert section["canaries"] == M and section["included"] == included and 0 < included < M
    # the run trained on the real samples minus the m sources, plus the included canaries
    assert section["training_samples"] == N - M + included and section["held_out_samples"] == M
    assert section["canary_fraction"] == pytest.approx(included / (N - M + included))
    assert section["accountant_epsilon"] is None and section["epsilon_gap"] is None
    # the bound is the paper's on the guesses the scores give, and well above 0
    again = audit(audit_cb.scores, audit_cb.included, delta=0.0, confidence=0.95)
    assert section["epsilon_lower_bound"] == pytest.approx(again.epsilon_lower_bound)
    assert section["epsilon_lower_bound"] > 1.0
    assert section["correct"] == again.correct and section["guesses"] == again.guesses
    assert section["abstentions"] == M - section["guesses"]
    assert audit_cb.scores[audit_cb.included].mean() > audit_cb.scores[~audit_cb.included].mean()
    # validation never saw a canary; the card's data facts count the user's training set
    val = torch.cat(seen.rows)
    assert len(val) == 200 * 3 and torch.equal(val[:200], dm.val.tensors[0])
    card = load_card(report.paths["json"])
    assert card["data"]["splits"]["train"]["size"] == N
    assert card["sections"]["privacy_audit"]["epsilon_lower_bound"] == pytest.approx(section["epsilon_lower_bound"])
    assert [s["status"] for s in card["standards"]] == ["met"]
    assert any(f["key"] == "privacy_audit.scores" for f in card["figures"])
    saved = json.loads((tmp_path / "lightning_trust" / "privacy_audit" / "privacy_audit.json").read_text())
    assert saved["epsilon_lower_bound"] == pytest.approx(section["epsilon_lower_bound"])
    assert t.callback_metrics["privacy_audit/epsilon_lower_bound"] == pytest.approx(section["epsilon_lower_bound"])
    assert train_loader_owner(t) is None  # the user's loader is back after fit


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_dp_runs_stay_below_their_accountant_epsilon(tmp_path, epsilon):
    pl.seed_everything(0)
    audit_cb = PrivacyAudit(num_canaries=M, seed=0)
    dp = _dp(epsilon)
    callbacks = [audit_cb, dp] if epsilon == 1.0 else [dp, audit_cb]  # either order
    t = trainer(tmp_path, callbacks=callbacks, max_epochs=6)
    t.fit(_module(), Data())
    section = audit_cb.report()
    included = int(audit_cb.included.sum())
    # the canaries went through the Poisson loader: DP's N counts them
    assert dp.num_samples == N - M + included == section["training_samples"]
    assert isinstance(t.train_dataloader.dataset, CanaryDataset)
    assert section["accountant_epsilon"] == pytest.approx(dp.epsilon_spent) and dp.epsilon_spent <= epsilon + 0.05
    assert section["delta"] == section["accountant_delta"] == 1e-3
    assert 0.0 <= section["epsilon_lower_bound"] < dp.epsilon_spent
    assert section["epsilon_gap"] == pytest.approx(dp.epsilon_spent - section["epsilon_lower_bound"])


@pytest.mark.parametrize("epsilon", [math.inf, 1.0])
def test_white_box_gradient_canaries_in_the_dp_optimizer(tmp_path, epsilon):
    pl.seed_everything(0)
    audit_cb = PrivacyAudit(num_canaries=100, canaries="gradient", seed=0)
    dp = _dp(epsilon)
    t = trainer(tmp_path, callbacks=[audit_cb, dp], max_steps=160)
    t.fit(_module(), Data())
    section = audit_cb.report()
    assert section["canary_type"] == "gradient" and section["score"] == "update_projection"
    assert section["training_samples"] == N and section["held_out_samples"] == 0
    # each included canary joins a step with the sample rate, drawn from (seed, step)
    expected = sum(
        int(((np.random.default_rng([0, 2, s]).random(100) < dp.sample_rate) & audit_cb.included).sum())
        for s in range(dp.steps)
    )
    assert section["canary_steps"] == expected > 0
    if math.isinf(epsilon):  # no noise: the canaries' own coordinates move
        assert section["epsilon_lower_bound"] > 0.5 and math.isinf(section["accountant_epsilon"])
    else:
        assert 0.0 <= section["epsilon_lower_bound"] < dp.epsilon_spent <= 1.05
