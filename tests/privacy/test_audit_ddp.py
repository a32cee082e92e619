"""PrivacyAudit under DDP (2 CPU ranks): the same canaries on every rank, sampled through the
distributed sampler (or DP's distributed Poisson sampler), scores gathered into one audit."""

import pytest

from tests.ddp_harness import run_ddp


@pytest.mark.slow
@pytest.mark.ddp
def test_every_rank_audits_the_same_canaries_with_gathered_scores(tmp_path):
    results = run_ddp(
        """
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_trust.privacy import DifferentialPrivacy, PrivacyAudit

        g = torch.Generator().manual_seed(0)
        x = torch.randn(400, 8, generator=g)
        data = TensorDataset(x, (x[:, 0] > 0).long())

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
            def forward(self, x):
                return self.net(x)
            def training_step(self, batch, batch_idx):
                return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        out = {}
        for private in (False, True):
            pl.seed_everything(0)
            audit = PrivacyAudit(num_canaries=60, seed=4)
            callbacks = [audit] + ([DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, accountant="rdp")]
                                   if private else [])
            trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=12, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 callbacks=callbacks)
            trainer.fit(Module(), DataLoader(data, batch_size=20, shuffle=True))
            loader = trainer.train_dataloader
            sampler = loader.batch_sampler if private else loader.sampler
            report = audit.report()
            out["dp" if private else "plain"] = {
                "sources": audit._inputs.sources.tolist(), "coin": audit.included.tolist(),
                "scores": audit.scores.tolist(), "bound": report["epsilon_lower_bound"],
                "samples": report["training_samples"], "length": len(loader.dataset),
                "sampler": type(sampler).__name__,
            }
        save_result(out)
        """,
        tmp_path,
    )
    r0, r1 = results
    for mode, sampler in (("plain", "DistributedSampler"), ("dp", "EvenDistributedPoissonSampler")):
        a, b = r0[mode], r1[mode]
        assert a["sources"] == b["sources"] and a["coin"] == b["coin"]  # the same canaries on every rank
        assert a["sampler"] == b["sampler"] == sampler
        assert a["length"] == a["samples"] == 400 - 60 + sum(a["coin"])
        assert a["scores"] == b["scores"] and a["bound"] == b["bound"]  # gathered: one audit
        assert len(a["scores"]) == 60
