"""Token-level targets under DP: HF's causal-LM loss averages over the batch's tokens, so the per-sample
loss assumption behind ε is not met unless the user declares a per-sample loss; the run warns once and
the report lists it, never a silent guarantee."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_trust.privacy import DifferentialPrivacy
from lightning_trust.privacy.token_loss import token_level_targets
from tests.foundation.models import build
from tests.privacy.dp_step import dp_step


def test_token_level_targets_are_integer_targets_with_a_token_dimension():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert token_level_targets({"input_ids": ids, "attention_mask": ids, "labels": ids})
    assert token_level_targets((torch.ones(2, 5), ids))
    assert not token_level_targets({"input_ids": ids, "labels": torch.tensor([0, 1])})  # one label per sample
    assert not token_level_targets((torch.ones(2, 3), torch.ones(2, 3)))  # float (regression) targets
    assert not token_level_targets({"input_ids": ids})  # no target at all
    with pytest.raises(ValueError, match="`per_sample_loss` must be True or False, got 'yes'"):
        DifferentialPrivacy(noise_multiplier=1.0, per_sample_loss="yes")  # type: ignore[arg-type]


def _fit(tmp_path, name: str, **kwargs):
    torch.manual_seed(0)
    module, datamodule = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp, _ = dp_step(tmp_path, module, datamodule, 1.0, **kwargs)
    return dp, [str(w.message) for w in caught if "token-level targets" in str(w.message)]


@pytest.mark.slow
def test_hf_token_mean_loss_is_reported_as_an_unmet_assumption_and_warned_once(tmp_path):
    dp, warned = _fit(tmp_path, "gpt2_lm")
    assert len(warned) == 1 and "per_sample_loss=True" in warned[0] and "reduction='none'" in warned[0]
    report = dp.report()
    assert report["unmet_assumptions"] == ["per_sample_loss"]
    assert "assumes a mean of per-sample losses" in report["guarantee"]


@pytest.mark.slow
def test_a_declared_per_sample_loss_or_one_label_per_sample_meets_it(tmp_path):
    dp, warned = _fit(tmp_path / "declared", "gpt2_lm", per_sample_loss=True)
    assert not warned and dp.report()["unmet_assumptions"] == []
    dp, warned = _fit(tmp_path / "cls", "gpt2_cls")
    assert not warned and dp.report()["unmet_assumptions"] == []
    assert "per-sample losses" not in dp.report()["guarantee"]
