"""Every private attribute the pack uses, exercised against the installed library versions.

When an upgrade moves one of them, this file fails, in one place (see ``lightning_trust.core.seam``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from lightning_trust.core import seam
from tests.support import trainer


class _Twice:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return 2 * len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            yield batch


class _Doubling(Callback):
    """Trains on every batch of the user's loader twice, through the seam."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.user_loaders: list[DataLoader] = []

    def on_fit_start(self, trainer, pl_module):
        seam.swap_train_loader(trainer, self, self.wrap, sharded=lambda loader: False)
        assert seam.train_loader_owner(trainer) is self
        seam.swap_train_loader(trainer, self, self.wrap)  # the same owner again: a no-op

    def wrap(self, loader):
        self.user_loaders.append(loader)
        return _Twice(loader)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch_idx)

    def teardown(self, trainer, pl_module, stage):
        seam.restore_train_loader(trainer, self)


def test_swap_train_loader_feeds_the_fit_loop_and_is_restored(tmp_path):
    swap = _Doubling()
    t = trainer(tmp_path, callbacks=[swap], max_epochs=1, limit_val_batches=0)
    t.fit(BoringModel(), train_dataloaders=DataLoader(RandomDataset(32, 8), batch_size=2))
    assert swap.seen == list(range(8)) and len(swap.user_loaders) == 1
    assert isinstance(swap.user_loaders[0], DataLoader) and len(swap.user_loaders[0]) == 4
    assert seam.train_loader_owner(t) is None
    assert "_requires_distributed_sampler" not in vars(t._data_connector)


def test_a_second_owner_is_refused(tmp_path):
    class Other(_Doubling):
        pass

    t = trainer(tmp_path, callbacks=[_Doubling(), Other()], max_epochs=1, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="Other cannot replace the train loader: _Doubling already did"):
        t.fit(BoringModel(), train_dataloaders=DataLoader(RandomDataset(32, 8), batch_size=2))


def test_sharded_loaders_get_no_distributed_sampler(tmp_path):
    t = trainer(tmp_path, max_epochs=1)
    t.strategy.connect(BoringModel())
    loader = DataLoader(RandomDataset(32, 8), batch_size=2)
    seam.swap_train_loader(t, "owner", lambda user: user, sharded=lambda dl: dl is loader)
    assert t._data_connector._requires_distributed_sampler(loader) is False
    seam.restore_train_loader(t, "owner")
    assert seam.train_loader_owner(t) is None


def test_rewrap_ddp_uses_strategy_internals_that_exist():
    from lightning.pytorch.strategies import DDPStrategy

    assert callable(DDPStrategy._setup_model) and callable(DDPStrategy._register_ddp_hooks)
    seam.rewrap_ddp(trainer(max_epochs=1))  # a single-device run: nothing to re-wrap


def test_loaded_checkpoint_is_the_dict_being_restored(tmp_path):
    first = trainer(tmp_path / "a", max_epochs=1, limit_val_batches=0)
    model = BoringModel()
    first.fit(model, train_dataloaders=DataLoader(RandomDataset(32, 8), batch_size=4))
    path = tmp_path / "boring.ckpt"
    first.save_checkpoint(path)
    assert seam.loaded_checkpoint(first) is None
    seen = {}

    resumed = trainer(tmp_path / "b", max_epochs=2, limit_val_batches=0)
    module = BoringModel()

    def hook(mod, state_dict, prefix, *args):
        if not prefix:
            seen["checkpoint"] = seam.loaded_checkpoint(resumed)

    module.register_load_state_dict_pre_hook(hook)
    resumed.fit(module, train_dataloaders=DataLoader(RandomDataset(32, 8), batch_size=4), ckpt_path=path)
    saved = torch.load(path, weights_only=False)
    assert seen["checkpoint"] is not None and seen["checkpoint"]["global_step"] == saved["global_step"]
    assert torch.equal(seen["checkpoint"]["state_dict"]["layer.weight"], saved["state_dict"]["layer.weight"])


def test_adopt_tensors_shares_the_source_dicts():
    module, source = nn.Linear(4, 3), nn.Linear(2, 1)
    seam.adopt_tensors(module, source)
    assert module.weight is source.weight and module.weight.shape == (1, 2)
    assert dict(module.named_parameters()).keys() == {"weight", "bias"}


def test_inductor_config_has_the_settings_the_int8_compile_sets():
    config = seam.inductor_config()
    assert hasattr(config, "freezing") and hasattr(config, "cpp_wrapper")


def test_torch_pruning_internals():
    import torch_pruning as tp

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    example = torch.randn(2, 4)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                  ignored_layers=[model[2]])  # fmt: skip
    channels = seam.pruner_initial_channels(pruner)
    assert isinstance(channels, dict)
    params, modules = seam.pruning_graph_names(pruner.DG)
    assert modules[model[0]] == "0" and modules[model[2]] == "2"
    assert isinstance(params, dict)


def test_fairlearn_thresholder_internals():
    from fairlearn.postprocessing import ThresholdOptimizer
    from sklearn.base import BaseEstimator

    class Scores(BaseEstimator):
        def fit(self, X, y):
            self.fitted_ = True
            return self

        def predict(self, X):
            return np.asarray(X)[:, 0]

    rng = np.random.default_rng(0)
    scores = rng.random(400)
    groups = rng.integers(0, 2, 400)
    labels = (scores + 0.2 * groups + rng.normal(0, 0.1, 400) > 0.6).astype(int)
    fitted = ThresholdOptimizer(estimator=Scores().fit(None, None), prefit=True, predict_method="predict").fit(
        scores.reshape(-1, 1), labels, sensitive_features=groups
    )
    interpolated, operation = seam.fairlearn_threshold_classes()
    thresholder = fitted.interpolated_thresholder_
    assert isinstance(thresholder, interpolated)
    assert all(isinstance(v.operation0, operation) for v in thresholder.interpolation_dict.values())
    p = seam.thresholder_positive_probability(thresholder, scores, groups)
    assert p.shape == (400,) and ((p >= 0) & (p <= 1)).all()
    sampled = np.mean(
        [fitted.predict(scores.reshape(-1, 1), sensitive_features=groups, random_state=s) for s in range(40)], axis=0
    )
    assert np.abs(sampled - p).mean() < 0.05


def test_state_key_of_matches_lightnings_own_format():
    class Named(Callback):
        pass

    key = seam.state_key_of(Named(), name="a", every=2)
    assert key == Named.__qualname__ + "{'name': 'a', 'every': 2}"
    assert seam.state_key_of(Named()) == Named.__qualname__ + "{}"
