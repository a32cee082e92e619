from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch_pruning as tp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_trust.compression import (
    ProgressivePruning,
    count_macs_params,
    load_pruned_checkpoint,
    output_layers,
    pruning_schedule,
    restore_pruned_structure,
)
from lightning_trust.compression.examples import example_from
from lightning_trust.core.batch import BatchContract
from lightning_trust.demo import SmallCNN, TabularMLP
from tests.support import trainer as make_trainer

X = torch.rand(4, 1, 8, 8)


# schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("final, steps", [(0.5, 3), (0.8, 5), (0.3, 1)])
def test_cubic_schedule_matches_zhu_and_gupta_at_each_step(final, steps):
    # Zhu & Gupta (2017) eq. 1: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, s_i = 0, t = t0 + k dt
    expected = [final + (0.0 - final) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]
    assert pruning_schedule("cubic", final, steps) == pytest.approx(expected, abs=1e-12)
    assert pruning_schedule("cubic", final, steps)[-1] == pytest.approx(final)


def test_linear_and_one_shot_schedules_and_epochs():
    assert pruning_schedule("linear", 0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    assert pruning_schedule("one_shot", 0.6, 3) == [0.6]
    cb = ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=7, frequency=2)
    assert cb.events() == [1, 3, 5, 7]
    assert cb.targets() == pytest.approx(pruning_schedule("cubic", 0.5, 4))
    assert ProgressivePruning(start_epoch=2).events(max_epochs=10) == [2, 3, 4, 5]
    assert ProgressivePruning(schedule="one_shot", start_epoch=3).events(max_epochs=10) == [3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pruning_ratio": 1.2}, "pruning_ratio"),
        ({"target_macs_ratio": 0.5, "target_speedup": 2.0}, "not both"),
        ({"target_speedup": 0.5}, "target_speedup"),
        ({"importance": "l1"}, "importance"),
        ({"schedule": "exp"}, "schedule"),
        ({"start_epoch": 3, "end_epoch": 1}, "end_epoch"),
        ({"frequency": 0}, "frequency"),
        ({"pruning_ratio": 0.97}, "max_pruning_ratio"),
        ({"example_input": "x"}, "example_input"),
    ],
)
def test_bad_arguments_fail_early(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ProgressivePruning(**kwargs)


def test_schedule_must_finish_before_max_epochs(tmp_path, digits):
    trainer = make_trainer(tmp_path, [ProgressivePruning(start_epoch=1, end_epoch=4)], max_epochs=3)
    with pytest.raises(ValueError, match="max_epochs=3"):
        trainer.fit(SmallCNN(), digits)


# output layers and refusals ------------------------------------------------------------------
def test_output_layer_is_found_and_ignored_automatically():
    assert output_layers(SmallCNN(), X) == ["classifier"]
    assert output_layers(TabularMLP(input_dim=10), torch.zeros(3, 10)) == ["classifier"]


class _Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n, 1, 1))

    def forward(self, x):
        return x * self.gain


class _CustomCNN(SmallCNN):
    def __init__(self):
        super().__init__()
        self.features.insert(1, _Scale(32))


class _Untraceable(SmallCNN):
    def forward(self, x):
        if x.shape[1] != 3:
            raise TypeError("this model wants RGB images")
        return super().forward(x)


def _fresh_callback(**kwargs):
    cb = ProgressivePruning(
        pruning_ratio=0.5, start_epoch=0, end_epoch=0, measure_latency=False, evaluate=False, **kwargs
    )
    cb._contract = BatchContract()
    cb._example = example_from(X)
    return cb


def test_custom_layer_without_pruner_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"'features\.1' \(_Scale\).*ignored_layers"):
        _fresh_callback()._build_pruner(None, _CustomCNN())


def test_untraceable_model_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match="could not trace _Untraceable.*example_input"):
        _fresh_callback()._build_pruner(None, _Untraceable())


def test_unknown_ignored_layer_is_refused():
    with pytest.raises(ValueError, match="classifer"):
        _fresh_callback(ignored_layers=["classifer"])._build_pruner(None, SmallCNN())


# one pruning step --------------------------------------------------------------------------
def _fake_trainer(optimizer):
    return SimpleNamespace(optimizers=[optimizer], current_epoch=0, global_step=1, max_epochs=1, strategy=None,
                           is_global_zero=True, callbacks=[], world_size=1)  # fmt: skip


def test_pruned_model_has_fewer_params_and_macs_and_carries_adam_moments():
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    # tag each moment with a function of its weight: after pruning they must still match channel by channel
    for p in model.parameters():
        optimizer.state[p]["exp_avg"] = p.detach() * 2 + 1
        optimizer.state[p]["exp_avg_sq"] = p.detach() ** 2 + 3
    macs0, params0 = tp.utils.count_ops_and_params(model, X[:1])  # MACs are per sample
    cb = _fresh_callback()
    cb._before = {"params": params0, "macs": macs0}
    cb._prune_event(_fake_trainer(optimizer), model, 0.5, 0)

    macs1, params1 = tp.utils.count_ops_and_params(model, X[:1])
    assert params1 < 0.5 * params0 and macs1 < 0.5 * macs0
    assert (model.features[0].out_channels, model.features[2].out_channels) == (16, 32)
    assert model.classifier.out_features == 10  # the output layer is untouched
    assert cb.report()["steps"][0]["params"] == params1 and cb.report()["steps"][0]["macs"] == macs1
    assert count_macs_params(model, X) == (macs1, params1)

    group_params = optimizer.param_groups[0]["params"]
    assert [id(p) for p in group_params] == [id(p) for p in model.parameters()]
    for p in model.parameters():
        state = optimizer.state[p]
        assert torch.equal(state["exp_avg"], p.detach() * 2 + 1)
        assert torch.equal(state["exp_avg_sq"], p.detach() ** 2 + 3)
        assert float(state["step"]) == 1.0
    assert len(optimizer.state) == len(list(model.parameters()))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # the optimizer keeps working on the pruned parameters


def test_sgd_momentum_is_carried_too():
    torch.manual_seed(0)
    model = TabularMLP(input_dim=10, hidden_dims=[16, 8])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 2, (8,))).backward()
    optimizer.step()
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = p.detach() - 7
    cb = ProgressivePruning(pruning_ratio=0.5, start_epoch=0, end_epoch=0, measure_latency=False, evaluate=False)
    cb._contract, cb._example = BatchContract(), torch.randn(4, 10)
    cb._before = {"params": 1, "macs": 1}
    cb._prune_event(_fake_trainer(optimizer), model, 0.5, 0)
    assert model.features[0].out_features == 8 and model.features[2].out_features == 4
    for p in model.parameters():
        assert torch.equal(optimizer.state[p]["momentum_buffer"], p.detach() - 7)


# training runs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_ratio_zero_gives_the_unpruned_models_logits(tmp_path, digits):
    logits = []
    for callbacks in ([], [ProgressivePruning(pruning_ratio=0.0, start_epoch=0, end_epoch=1, measure_latency=False)]):
        pl.seed_everything(0)
        model = SmallCNN()
        make_trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=6).fit(model, digits)
        with torch.no_grad():
            logits.append(model.eval()(digits.val_dataset.tensors[0][:32]))
    assert torch.equal(logits[0], logits[1])


class _StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _pruning(**kwargs):
    return ProgressivePruning(pruning_ratio=0.5, start_epoch=1, end_epoch=3, measure_latency=False, **kwargs)


@pytest.mark.slow
def test_kill_and_resume_mid_schedule_ends_like_an_uninterrupted_run(tmp_path, digits):
    def run(folder, stop=None, ckpt_path=None):
        pl.seed_everything(0)
        model = SmallCNN()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, filename="{epoch}")
        callbacks = [_pruning(), checkpoint] + ([_StopAfter(stop)] if stop is not None else [])
        trainer = make_trainer(
            tmp_path / folder, callbacks, max_epochs=5, enable_checkpointing=True, limit_train_batches=8
        )
        trainer.fit(model, digits, ckpt_path=ckpt_path)
        return model, trainer

    full, full_trainer = run("full")
    _, killed = run("killed", stop=1)  # killed after epoch 1: one of three pruning steps done
    assert killed.current_epoch == 2 and killed.callbacks[0]._done == 1
    resumed, resumed_trainer = run("resumed", ckpt_path=tmp_path / "killed" / "epoch=1.ckpt")

    shapes = lambda m: {n: tuple(p.shape) for n, p in m.state_dict().items()}  # noqa: E731
    assert shapes(resumed) == shapes(full)
    report_full, report_resumed = full_trainer.callbacks[0].report(), resumed_trainer.callbacks[0].report()
    assert report_resumed["channel_ratio"] == report_full["channel_ratio"] == 0.5
    assert report_resumed["params_after"] == report_full["params_after"]
    assert [s["channel_ratio"] for s in report_resumed["steps"]] == [s["channel_ratio"] for s in report_full["steps"]]
    # the first step came from the checkpoint: the very same channels were removed
    assert resumed_trainer.callbacks[0]._history[:2] == full_trainer.callbacks[0]._history[:2]
    # the resumed optimizer state matches the pruned parameters (moments restored, then carried through steps 2-3)
    optimizer = resumed_trainer.optimizers[0]
    for p in resumed.parameters():
        assert optimizer.state[p]["exp_avg"].shape == p.shape
    # (the weights differ: the demo datamodule reshuffles from its seed on resume, so epochs 2-4 see other orders)


@pytest.mark.slow
def test_test_ckpt_path_and_loading_outside_lightning_on_a_pruned_model(tmp_path, digits):
    pl.seed_everything(0)
    model = SmallCNN()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}", save_last=True)
    trainer = make_trainer(
        tmp_path, [_pruning(), checkpoint], max_epochs=5, enable_checkpointing=True, limit_train_batches=8
    )
    trainer.fit(model, digits)
    expected = trainer.test(model, digits, verbose=False)[0]["test/acc"]

    # a fresh, unpruned model: the callback rebuilds the structure before the weights load
    fresh = SmallCNN()
    tester = make_trainer(tmp_path, [_pruning()], max_epochs=1)
    assert tester.test(fresh, digits, ckpt_path=checkpoint.last_model_path, verbose=False)[0]["test/acc"] == expected
    assert fresh.features[0].out_channels == 16

    # the same pruned in-memory model, tested on an earlier (less pruned) checkpoint
    earlier = trainer.test(model, digits, ckpt_path=str(tmp_path / "epoch=1.ckpt"), verbose=False)[0]["test/acc"]
    reference = load_pruned_checkpoint(SmallCNN, tmp_path / "epoch=1.ckpt")
    assert model.features[0].out_channels == reference.features[0].out_channels > 16
    assert earlier == make_trainer(tmp_path, [], max_epochs=1).test(reference, digits, verbose=False)[0]["test/acc"]

    # outside Lightning: the documented loaders
    images = digits.test_dataset.tensors[0][:64]
    loaded = load_pruned_checkpoint(SmallCNN, checkpoint.last_model_path).eval()
    final = load_pruned_checkpoint(SmallCNN, checkpoint.last_model_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), final.eval()(images))
    state = torch.load(checkpoint.last_model_path, weights_only=True)
    plain = SmallCNN()
    restore_pruned_structure(plain, state)
    plain.load_state_dict(state["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), loaded(images))
    with pytest.raises(RuntimeError, match="size mismatch"):
        SmallCNN.load_from_checkpoint(checkpoint.last_model_path)  # why the loader exists


@pytest.mark.slow
def test_target_macs_ratio_prunes_until_measured_macs_reach_it(tmp_path, digits):
    pl.seed_everything(0)
    model = SmallCNN()
    cb = ProgressivePruning(
        target_macs_ratio=0.4, schedule="linear", start_epoch=0, end_epoch=1, measure_latency=False, evaluate=False
    )
    make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=3, limit_val_batches=1).fit(model, digits)
    report = cb.report()
    macs, _ = tp.utils.count_ops_and_params(model, X[:1])
    assert report["macs_after"] == macs <= 0.4 * report["macs_before"]
    assert macs > 0.3 * report["macs_before"]  # stopped near the target, not far below
    assert report["steps"][0]["macs_ratio"] <= 0.7  # linear: half of the 60% MACs reduction first


@pytest.mark.slow
@pytest.mark.parametrize(
    "importance, kwargs",
    [("taylor", {}), ("lamp", {}), ("hessian", {}), ("random", {}), ("bn_scale", {"sparsity_regularization": 1e-4}),
     ("group_magnitude", {"sparsity_regularization": 1e-4, "global_pruning": True})],
)  # fmt: skip
def test_every_importance_prunes_with_the_library(tmp_path, digits, importance, kwargs):
    pl.seed_everything(0)
    model = SmallCNN(batch_norm=True)
    cb = ProgressivePruning(pruning_ratio=0.5, importance=importance, schedule="one_shot", start_epoch=0,
                            measure_latency=False, evaluate=False, **kwargs)  # fmt: skip
    make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(model, digits)
    report = cb.report()
    assert report["params_after"] < 0.6 * report["params_before"]
    assert model.classifier.out_features == 10
    assert model.features[1].num_features == model.features[0].out_channels  # BN pruned with its conv
    if importance == "bn_scale":
        assert isinstance(cb._pruner, tp.pruner.BNScalePruner)
    elif "sparsity_regularization" in kwargs:
        assert isinstance(cb._pruner, tp.pruner.GroupNormPruner)


@pytest.mark.slow
def test_report_figure_and_logged_metrics(tmp_path, digits):
    from lightning.pytorch.loggers import CSVLogger

    pl.seed_everything(0)
    cb = ProgressivePruning(pruning_ratio=0.5, start_epoch=0, end_epoch=1)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3, logger=CSVLogger(tmp_path), limit_train_batches=4)
    trainer.fit(SmallCNN(), digits)
    report = cb.report()
    for key in ("params_before", "params_after", "macs_before", "macs_after", "param_ratio", "macs_ratio", "speedup",
                "accuracy_before", "accuracy_after"):  # fmt: skip
        assert isinstance(report[key], (int, float)), key
    assert report["param_ratio"] == report["params_after"] / report["params_before"]
    assert 0 <= report["accuracy_after"] <= 1 and report["speedup"] > 0
    assert (
        tmp_path / "lightning_logs" / "version_0" / "lightning_trust" / "compression" / "pruning_curve.png"
    ).exists()
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "compression/params" in metrics and "compression/macs" in metrics


@pytest.mark.slow
@pytest.mark.ddp
def test_pruning_under_ddp_on_two_cpu_processes(tmp_path):
    from tests.ddp_harness import run_ddp

    results = run_ddp(
        """
        from lightning_trust.compression import ProgressivePruning
        pl.seed_everything(0)
        cb = ProgressivePruning(pruning_ratio=0.5, start_epoch=0, end_epoch=1, measure_latency=False)
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_train_batches=5, callbacks=[cb])
        model = SmallCNN()
        trainer.fit(model, DigitsDataModule())
        report = cb.report()
        save_result({"shapes": {n: list(p.shape) for n, p in model.state_dict().items()},
                     "sum": float(sum(p.detach().sum() for p in model.parameters())),
                     "params": report["params_after"], "before": report["params_before"],
                     "acc": report["accuracy_after"], "ddp_params": sum(1 for _ in trainer.strategy.model.parameters()),
                     "optim_params": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups)})
        """,
        tmp_path,
    )
    assert results[0]["shapes"] == results[1]["shapes"]
    assert results[0]["params"] < 0.5 * results[0]["before"]
    # gradients of the new parameters were still all-reduced after the re-wrap: the ranks agree
    assert results[0]["sum"] == pytest.approx(results[1]["sum"], rel=1e-6)
    assert results[0]["acc"] == pytest.approx(results[1]["acc"])
    assert results[0]["ddp_params"] == results[0]["optim_params"] == 6


def test_restore_refuses_a_checkpoint_without_pruning():
    with pytest.raises(KeyError, match="no pruning structure"):
        restore_pruned_structure(SmallCNN(), {"state_dict": {}})


def test_restoring_a_pruned_structure_keeps_the_training_mode(tmp_path, digits):
    # torch-pruning's trace switches the model to eval mode; a resumed fit must keep training with dropout etc.
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    pruning = ProgressivePruning(
        pruning_ratio=0.5, schedule="one_shot", start_epoch=0, end_epoch=0, measure_latency=False, evaluate=False
    )
    make_trainer(tmp_path, [pruning, checkpoint], max_epochs=1, enable_checkpointing=True, limit_train_batches=2).fit(
        SmallCNN(), digits
    )
    model = SmallCNN().train()
    restore_pruned_structure(model, tmp_path / "epoch=0.ckpt")
    assert model.features[0].out_channels < SmallCNN().features[0].out_channels
    assert all(m.training for m in model.modules())
    frozen = SmallCNN().eval()
    restore_pruned_structure(frozen, tmp_path / "epoch=0.ckpt")
    assert not any(m.training for m in frozen.modules())
