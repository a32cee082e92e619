import pytest

from tests.ddp_harness import run_ddp


@pytest.mark.slow
@pytest.mark.ddp
def test_tabular_mlp_fits_one_epoch_with_ddp_on_cpu(tmp_path):
    results = run_ddp(
        """
        pl.seed_everything(0)
        dm = AdultDataModule(batch_size=512)
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        model = TabularMLP()
        trainer.fit(model, dm)
        first = next(model.parameters()).detach()
        save_result({"world_size": trainer.world_size, "rank": trainer.global_rank, "steps": trainer.global_step,
                     "val_acc": float(trainer.callback_metrics["val/acc"]), "param_sum": float(first.sum())})
        """,
        tmp_path,
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    # the 27,146 training rows are split over two ranks: ceil(13,573 / 512) = 27 steps each
    assert results[0]["steps"] == results[1]["steps"] == 27
    assert results[0]["param_sum"] == pytest.approx(results[1]["param_sum"])  # gradients were all-reduced
    assert results[0]["val_acc"] == pytest.approx(results[1]["val_acc"]) and results[0]["val_acc"] > 0.75
