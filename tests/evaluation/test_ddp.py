"""Under DDP (2 CPU processes) the per-domain numbers equal scikit-learn on the whole filtered arrays."""

import pytest
import torch

from lightning_trust.demo import TabularMLP
from tests.ddp_harness import run_ddp
from tests.evaluation.helpers import probabilities, reference_metrics


@pytest.mark.slow
@pytest.mark.ddp
def test_per_domain_metrics_under_ddp_equal_sklearn(adult, tmp_path):
    results = run_ddp(
        """
        from lightning_trust.evaluation import CrossDomainEvaluation
        pl.seed_everything(0)
        dm = AdultDataModule(batch_size=256)
        cb = CrossDomainEvaluation(domain_key="native_region", in_domain=["United-States"],
                                   metrics=["accuracy", "f1", "auroc", "nll", "ece"], buffer_size=500,
                                   domains={"test_split": "test_dataloader"}, figures=True, max_overhead=None)
        budgeted = CrossDomainEvaluation(domains={"test_split": "test_dataloader"}, metrics=["accuracy"],
                                         name="budgeted")  # max_overhead=0.05: rank zero decides the batches
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=6,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(OUT), callbacks=[cb, budgeted])
        model = TabularMLP()
        trainer.fit(model, dm)
        if trainer.global_rank == 0:
            torch.save(model.state_dict(), OUT / "model.pt")
        report = cb.report()
        save_result({"rank": trainer.global_rank, "sizes": report["sizes"], "per_domain": report["per_domain"],
                     "worst_domain": report["worst_domain"], "ood_gap": report["ood_gap"],
                     "figures": sorted(report["figures"]), "budgeted": budgeted.report()["extra_samples"],
                     "budgeted_sizes": budgeted.report()["sizes"],
                     "logged": float(trainer.callback_metrics["domain/Asia/accuracy"])})
        """,
        tmp_path,
    )
    rank0, rank1 = results
    assert rank0["per_domain"] == rank1["per_domain"] and rank0["sizes"] == rank1["sizes"]
    # within the budget both processes evaluate the batches rank zero decided: the same counts, summed
    assert rank0["budgeted"] == rank1["budgeted"] and rank0["budgeted_sizes"] == rank1["budgeted_sizes"]
    cut = rank0["budgeted"]["domains"]["test_split"]
    assert cut["samples"] == rank0["budgeted_sizes"]["test_split"] and cut["samples"] % 512 == 0  # 2 x 256 a batch
    assert cut["samples_available"] == 15060 and cut["truncated"] == (cut["samples"] < 15060)
    assert rank0["logged"] == pytest.approx(rank0["per_domain"]["Asia"]["accuracy"])
    assert "reliability_Asia" in rank0["figures"]
    model = TabularMLP()
    model.load_state_dict(torch.load(tmp_path / "ddp_out" / "model.pt"))
    for split, dataset in (("val", adult.val_dataset), ("test_split", adult.test_dataset)):
        probs = probabilities(model, dataset.tensors["x"])
        target, region = dataset.tensors["y"].numpy(), dataset.tensors["native_region"].numpy()
        if split == "test_split":
            assert rank0["sizes"]["test_split"] == len(target)  # each sample once over both processes
            expected = reference_metrics(probs, target)
            for metric, value in expected.items():
                assert rank0["per_domain"]["test_split"][metric] == pytest.approx(value, abs=1e-5), metric
            continue
        for code, name in enumerate(adult.categories["native_region"]):
            mask = region == code
            assert rank0["sizes"][name] == int(mask.sum())
            for metric, value in reference_metrics(probs[mask], target[mask]).items():
                assert rank0["per_domain"][name][metric] == pytest.approx(value, abs=1e-5), (name, metric)
