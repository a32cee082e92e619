"""Federated training of a plain LightningModule on Adult: simulated clients, or one client per process.

    python examples/federated_adult.py                       # 10 simulated clients, Dirichlet(0.5), FedAvg
    python examples/federated_adult.py --aggregator fedadam --proximal-mu 0.01
    python examples/federated_adult.py --client-dp           # DP-FedAvg, client-level epsilon logged
    python examples/federated_adult.py --mode strategy       # 2 processes (DDP launcher), each one client

Flower (real deployments across organisations): see examples/flower/.
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_trust.demo import AdultDataModule, TabularMLP
from lightning_trust.federated import ClientDP, FederatedSimulation
from lightning_trust.federated.strategy import FederatedStrategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["simulation", "strategy"], default="simulation")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--partition", default="dirichlet(0.5)")
    parser.add_argument("--aggregator", default="fedavg")
    parser.add_argument("--proximal-mu", type=float, default=0.0)
    parser.add_argument("--client-dp", action="store_true", help="DP-FedAvg (clip 0.5, noise multiplier 1.0)")
    args = parser.parse_args()

    pl.seed_everything(42)
    dp = ClientDP(clip_norm=0.5, noise_multiplier=1.0, delta=1e-3) if args.client_dp else None
    logger = CSVLogger("runs/federated_adult", name=args.mode)
    if args.mode == "simulation":
        federated = FederatedSimulation(
            num_clients=args.clients,
            clients_per_round=args.clients_per_round,
            local_steps=args.local_steps,
            partition=args.partition,
            aggregator=args.aggregator,
            proximal_mu=args.proximal_mu,
            client_dp=dp,
            seed=42,
        )
        trainer = pl.Trainer(max_epochs=args.rounds, callbacks=[federated], logger=logger, accelerator="cpu", devices=1)
    else:
        strategy = FederatedStrategy(
            local_steps=args.local_steps, aggregator=args.aggregator, proximal_mu=args.proximal_mu, client_dp=dp
        )
        trainer = pl.Trainer(
            max_epochs=max(1, args.rounds // 5), strategy=strategy, accelerator="cpu", devices=2, logger=logger
        )
    trainer.fit(TabularMLP(), AdultDataModule(batch_size=64))
    if trainer.is_global_zero:
        reporter = federated if args.mode == "simulation" else strategy
        report = reporter.report()
        report.pop("per_round")
        print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
