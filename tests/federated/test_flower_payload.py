"""Adapter-only federation on Flower, one round in process (no Ray): our Strategy's train messages go
to our ClientApp on two nodes and the replies back to the Strategy. Only the trainable tensors of a
PEFT LoRA BERT travel either way, bytes are measured from the ArrayRecords, and a node whose frozen
base differs from the server's refuses to train."""

import pytest
import torch

from lightning_trust.federated import FedAvg
from lightning_trust.federated.payload import base_fingerprint, frozen_names, payload_keys, payload_state
from tests.foundation.models import build

flwr = pytest.importorskip("flwr")


@pytest.fixture
def flower_task(monkeypatch):
    """The process identity Flower's Message needs (set by a SuperNode/simulation, here by hand)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class Grid:
    """The part of Flower's Grid that FedAvg.configure_train reads: two connected nodes."""

    def get_node_ids(self):
        return [11, 12]


def _module(seed=0):
    return build("bert_lora", seed=seed)[0]


def _datamodule():
    return build("bert_lora")[1]


def _round(client, strategy, arrays, config):
    from flwr.app import Context, RecordDict

    messages = list(strategy.configure_train(1, arrays, config, Grid()))
    replies = []
    for pid, msg in enumerate(messages):
        context = Context(run_id=1, node_id=pid, node_config={"partition-id": pid, "num-partitions": 2},
                          state=RecordDict(), run_config={})  # fmt: skip
        replies.append(client(msg, context))
    return messages, replies


@pytest.mark.slow
def test_a_flower_round_sends_and_aggregates_only_the_adapters(flower_task):
    from flwr.app import ArrayRecord, ConfigRecord

    from lightning_trust.federated.flower import FINGERPRINT, client_app, flower_strategy

    client = client_app(_module, _datamodule, partition="iid", local_steps=2)
    strategy = flower_strategy("fedavg", min_train_nodes=2, min_available_nodes=2)
    module = _module()
    strategy.param_keys = {n for n, _ in module.named_parameters()}
    keys = payload_keys(module, "trainable")
    frozen = set(frozen_names(module))
    arrays = ArrayRecord.from_torch_state_dict(payload_state(module, keys))
    messages, replies = _round(client, strategy, arrays, ConfigRecord({FINGERPRINT: base_fingerprint(module)}))
    assert len(messages) == 2 and not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
    sent_back = [r.content["arrays"].to_torch_state_dict() for r in replies]
    for state in sent_back:
        assert list(state) == keys and not set(state) & frozen
    new, metrics = strategy.aggregate_train(1, replies)
    new_state = new.to_torch_state_dict()
    assert list(new_state) == keys
    expected = FedAvg().aggregate(payload_state(module, keys), sent_back, [48, 48])
    for k in keys:
        torch.testing.assert_close(new_state[k].float(), expected[k].float(), atol=1e-6, rtol=0)
    # bytes measured from the ArrayRecords that travelled, a fraction of the whole model's
    up = sum(r.content["arrays"].count_bytes() for r in replies)
    assert metrics["federated_bytes_up"] == up and metrics["federated_bytes_down"] == 2 * arrays.count_bytes()
    full = ArrayRecord.from_torch_state_dict(payload_state(module, payload_keys(module, "full")))
    assert 5 * arrays.count_bytes() < full.count_bytes()
    assert strategy.history[0]["bytes_up"] == up


def test_a_node_with_another_frozen_base_refuses_to_train(flower_task):
    from flwr.app import ArrayRecord, ConfigRecord

    from lightning_trust.federated.flower import FINGERPRINT, client_app, flower_strategy

    server_module = _module(seed=0)
    client = client_app(lambda: _module(seed=1), _datamodule, partition="iid", local_steps=1)  # unseeded per node
    strategy = flower_strategy("fedavg", min_train_nodes=2, min_available_nodes=2)
    arrays = ArrayRecord.from_torch_state_dict(payload_state(server_module, payload_keys(server_module, "trainable")))
    config = ConfigRecord({FINGERPRINT: base_fingerprint(server_module)})
    try:
        _, replies = _round(client, strategy, arrays, config)
    except ValueError as err:  # raised by the ClientApp in this process
        message = str(err)
    else:
        assert all(r.has_error() for r in replies)
        message = str(replies[0].error.reason)
    assert "frozen parameters differ from the server's" in message and "payload='full'" in message
