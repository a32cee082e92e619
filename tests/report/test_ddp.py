import json

import pytest

from tests.ddp_harness import run_ddp


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_rank_zero_writes_one_card_and_every_rank_agrees_on_the_verdict(tmp_path):
    results = run_ddp(
        f"""
        from lightning_trust.report import TrustReport
        pl.seed_everything(0)
        report = TrustReport(standards={{"metrics.val/acc": {{"min": 0.999}}, "model.params": {{"max": 10**6}}}},
                             fail_on_breach=True, output_dir={str(tmp_path / "card")!r})
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=3,
                             limit_val_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[report])
        trainer.fit(TabularMLP(hidden_dims=[16]), AdultDataModule(batch_size=256))
        save_result({{"rank": trainer.global_rank, "exit_code": report.exit_code,
                     "verdicts": [s["status"] for s in report.card["standards"]],
                     "val_acc": report.card["metrics"]["val/acc"]}})
        """,
        tmp_path,
    )
    assert [r["exit_code"] for r in results] == [1, 1]
    assert results[0]["verdicts"] == results[1]["verdicts"] == ["not_met", "met"]
    assert results[0]["val_acc"] == pytest.approx(results[1]["val_acc"])  # synced metric
    card = json.loads((tmp_path / "card" / "model_card.json").read_text())
    assert card["training"]["hardware"]["devices"] == 2 and card["training"]["hardware"]["strategy"] == "DDPStrategy"
    assert card["training"]["global_steps"] == 3
