"""Content keys: the same sample keeps its key and its coin under any batching, order or padding."""

import torch
from scipy import stats

from lightning_trust.evaluation.sample_keys import calibrates, sample_keys


def test_keys_ignore_batching_and_order_and_the_coin_has_the_asked_share():
    x, y = torch.randn(4000, 5, dtype=torch.float64), torch.randint(0, 3, (4000,))
    keys = sample_keys(x, y, seed=2)
    assert torch.equal(torch.cat([sample_keys(x[i : i + 333], y[i : i + 333], 2) for i in range(0, 4000, 333)]), keys)
    perm = torch.randperm(4000)
    assert torch.equal(sample_keys(x[perm], y[perm], 2), keys[perm])
    assert keys.unique().numel() == 4000
    share = int(calibrates(keys, 0.3).sum())
    assert stats.binomtest(share, 4000, 0.3).pvalue > 1e-3  # a fair coin of the asked bias
    other = calibrates(sample_keys(x, y, seed=3), 0.3)
    assert 0.3 < (other != calibrates(keys, 0.3)).float().mean() < 0.5  # another seed, another split (2pq = 0.42)
    flipped = y.clone()
    flipped[0] = (y[0] + 1) % 3
    assert sample_keys(x, flipped, 2)[0] != keys[0] and torch.equal(sample_keys(x, flipped, 2)[1:], keys[1:])


def test_right_padding_to_any_length_keeps_the_key():
    ids = torch.randint(1, 50, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    short = sample_keys({"input_ids": ids, "attention_mask": mask}, torch.arange(6), 0)
    padded = {"input_ids": torch.cat([ids, torch.full((6, 4), 99)], 1),  # a non-zero pad id, masked out
              "attention_mask": torch.cat([mask, torch.zeros(6, 4, dtype=torch.long)], 1)}  # fmt: skip
    assert torch.equal(sample_keys(padded, torch.arange(6), 0), short)
    images = torch.rand(6, 3, 4, 4, dtype=torch.bfloat16)
    assert sample_keys((images, torch.ones(6, 2, dtype=torch.bool)), torch.arange(6), 0).shape == (6,)
