import lightning.pytorch as pl
import pytest
import torch

from lightning_trust.demo import SmallCNN, TabularMLP


def test_models_forward_shapes():
    assert TabularMLP(input_dim=104)(torch.randn(5, 104)).shape == (5, 2)
    assert SmallCNN()(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in SmallCNN(batch_norm=True).modules())


def test_model_argument_validation():
    with pytest.raises(ValueError, match="input_dim"):
        TabularMLP(input_dim=0)
    with pytest.raises(ValueError, match="optimizer"):
        TabularMLP(optimizer="rmsprop")
    with pytest.raises(ValueError, match="channels"):
        SmallCNN(channels=[8])


def test_tabular_mlp_refuses_wrong_input_dim(adult):
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="input_dim: 104"):
        trainer.fit(TabularMLP(input_dim=10), adult)


@pytest.mark.slow
def test_models_learn_on_demo_data(adult, digits, tmp_path):
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = TabularMLP()
    trainer.fit(model, adult)
    assert trainer.callback_metrics["val/acc"] > 0.8
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(SmallCNN(), digits)
    assert trainer.callback_metrics["val/acc"] > 0.8
