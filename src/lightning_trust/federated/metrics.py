"""The names the federated callbacks log (through Lightning's loggers) and report, with their
meaning: the ``logged_keys`` and ``report_keys`` of :class:`~lightning_trust.federated.FederatedSimulation`
and :class:`~lightning_trust.federated.FederatedStrategy`, kept true by ``tests/federated``.

``<id>`` stands for a client id.

Example:
    >>> SIMULATION_LOGGED_KEYS["federated/epsilon"]
    'client-level DP ε spent so far (with client_dp)'
    >>> sorted(set(SIMULATION_REPORT_KEYS) - set(STRATEGY_REPORT_KEYS))[2:7]
    ['byzantine_clients', 'dropout_rate', 'frozen_bytes', 'local_epochs', 'partition']
"""

from __future__ import annotations

__all__ = ["SIMULATION_LOGGED_KEYS", "SIMULATION_REPORT_KEYS", "STRATEGY_LOGGED_KEYS", "STRATEGY_REPORT_KEYS"]

#: What :class:`~lightning_trust.federated.FederatedSimulation` logs once per round.
SIMULATION_LOGGED_KEYS: dict[str, str] = {
    "federated/round": "rounds completed",
    "federated/clients_failed": "clients of the round that failed (dropout) and sent nothing",
    "federated/clients_aggregated": "client updates aggregated in the round",
    "federated/update_norm_mean": "mean L2 norm of the clients' updates (w_client - w_global)",
    "federated/client_drift": "mean L2 distance of the client updates from their mean",
    "federated/global_update_norm": "L2 norm of the change of the global model in the round",
    "federated/epsilon": "client-level DP ε spent so far (with client_dp)",
    "federated/train_loss_mean": "mean of the aggregated clients' training losses in the round",
    "federated/bytes_up": "bytes the clients sent in the round (their payloads, measured)",
    "federated/bytes_down": "bytes the server sent in the round (the global payload, to every selected client)",
    "federated/clip_norm": "client-level DP clip norm the round used (with client_dp; moves with adaptive clipping)",
    "federated/unclipped_fraction": "noisy share of client updates within the clip norm (adaptive clipping)",
    "federated/client_<id>/train_loss": "a client's mean training loss in the round (log_clients)",
    "federated/client_<id>/samples": "training samples a client's steps saw in the round (log_clients)",
}
#: The top-level keys of :meth:`~lightning_trust.federated.FederatedSimulation.report` (besides figures).
SIMULATION_REPORT_KEYS: dict[str, str] = {
    "mode": "'simulation'",
    "rounds": "rounds completed",
    "num_clients": "clients the training set was split into",
    "clients_per_round": "clients selected per round (expected number under Poisson sampling)",
    "sample_rate": "expected share of clients per round",
    "aggregator": "the aggregation rule's name",
    "aggregator_config": "the aggregator with its settings",
    "local_steps": "optimizer steps per client and round (or null)",
    "local_epochs": "passes over its data per client and round (or null)",
    "proximal_mu": "FedProx coefficient",
    "dropout_rate": "probability that a selected client fails mid-round",
    "byzantine_clients": "the sign-flipping attackers' client ids",
    "keep_local": "parameter/buffer patterns that never leave a client",
    "payload": "what travels: 'trainable' (requires_grad parameters and buffers) or 'full' (every tensor)",
    "payload_tensors": "tensors one client's payload holds (keep_local excluded)",
    "payload_bytes": "bytes of one client's payload, each way",
    "frozen_bytes": "bytes of the frozen parameters that never leave a client (payload='trainable')",
    "bytes_up_per_round": "mean bytes the clients sent per round (measured)",
    "bytes_down_per_round": "mean bytes the server sent per round (measured)",
    "partition": "the partition: its description, client sizes and label histograms",
    "final_val": "the global model's last validation metrics",
    "per_round": "one record per round: clients, failures, losses, samples, steps, aggregation metrics",
    "epsilon": "client-level DP ε spent (with client_dp)",
    "delta": "client-level DP δ (with client_dp)",
    "client_dp": "the client-level DP report: clipping, noise, accountant (with client_dp)",
}

#: What :class:`~lightning_trust.federated.FederatedStrategy` logs at each aggregation (on step).
STRATEGY_LOGGED_KEYS: dict[str, str] = {
    "federated/round": "aggregations (rounds) completed",
    "federated/update_norm_mean": "mean L2 norm of the processes' updates (w_client - w_global)",
    "federated/client_drift": "mean L2 distance of the process updates from their mean",
    "federated/global_update_norm": "L2 norm of the change of the global model in the round",
    "federated/epsilon": "client-level DP ε spent so far (with client_dp)",
    "federated/bytes_exchanged": "bytes all processes contributed to the round's all_gather (float64 payloads)",
    "federated/clip_norm": "client-level DP clip norm the round used (with client_dp)",
}

#: The top-level keys of :meth:`~lightning_trust.federated.FederatedStrategy.report`.
STRATEGY_REPORT_KEYS: dict[str, str] = {
    "mode": "'strategy'",
    "rounds": "aggregations (rounds) completed",
    "num_clients": "processes (each one client)",
    "clients_per_round": "processes per round (all of them)",
    "aggregator": "the aggregation rule's name",
    "aggregator_config": "the aggregator with its settings",
    "local_steps": "optimizer steps per process between aggregations",
    "proximal_mu": "FedProx coefficient",
    "keep_local": "parameter/buffer patterns that never leave a process",
    "payload": "what is exchanged: 'trainable' (requires_grad parameters and buffers) or 'full' (every tensor)",
    "final_val": "the global model's last validation metrics",
    "per_round": "one record per round: steps, samples per process, aggregation metrics",
    "epsilon": "client-level DP ε spent (with client_dp)",
    "delta": "client-level DP δ (with client_dp)",
    "client_dp": "the client-level DP report: clipping, noise, accountant (with client_dp)",
}
