"""Run the Lightning + lightning-trust Flower app on Flower's simulation engine (Ray), on one machine.

    pip install "lightning-trust[federated]" "flwr[simulation]"
    python examples/flower/run_simulation.py --clients 4 --rounds 3 --local-steps 20 --out flower_result.json

For a real deployment run the same app on Flower's SuperLink and SuperNodes (see README.md here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--aggregator", default="fedavg")
    parser.add_argument("--partition", default="dirichlet(0.5)")
    parser.add_argument("--out", default=None, help="write final metrics (JSON) here")
    args = parser.parse_args()

    from flwr.simulation import run_simulation
    from task import make_client_app, make_server_app

    from lightning_trust.demo import AdultDataModule
    from lightning_trust.federated.flower import evaluate_client

    summary: dict = {}

    def on_result(result, module) -> None:
        dm = AdultDataModule(batch_size=1024)
        summary["final_val"] = evaluate_client(module, dm)
        summary["rounds"] = args.rounds
        summary["train_metrics"] = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
        summary["param_sum"] = float(sum(p.detach().sum() for p in module.parameters()))

    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(args.rounds, args.aggregator, on_result, num_nodes=args.clients),
        client_app=make_client_app(args.local_steps, args.partition),
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False},
        },
    )
    summary["wall_s"] = time.perf_counter() - start
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    if "final_val" not in summary:
        raise SystemExit("The Flower run did not finish (no final result).")


if __name__ == "__main__":
    main()
