"""Adapter-only federation killed and resumed, between rounds and mid-round: the same adapters, the same
bytes per round and the same frozen base as the uninterrupted run (issue #15, checkpoint-safe payloads)."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_trust.federated import FederatedSimulation
from lightning_trust.federated.payload import frozen_names
from tests.foundation.models import build
from tests.privacy.dp_step import without_dropout
from tests.support import trainer


def _run(tmp_path, ckpt_path=None, checkpoint=False):
    torch.manual_seed(0)  # the same random init of the adapters and head in every run
    module, dm = build("bert_lora")
    without_dropout(module)  # Lightning does not restore torch's RNG on resume: no random draws in training
    sim = FederatedSimulation(num_clients=2, local_steps=2, seed=0, payload="trainable")
    callbacks = [sim]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=1, filename="{step}"))
    t = trainer(tmp_path, callbacks=callbacks, max_epochs=3, limit_val_batches=1, enable_checkpointing=checkpoint)
    t.fit(module, dm, ckpt_path=ckpt_path)
    return module, sim


@pytest.mark.slow
def test_adapter_only_federation_resumes_between_and_within_rounds(tmp_path):
    full, full_sim = _run(tmp_path / "full", checkpoint=True)
    base = {n: p.detach().clone() for n, p in full.named_parameters() if n in set(frozen_names(full))}

    # a round is 2 clients x 2 local steps: step 4 ends round 1, step 5 is inside round 2 (first client)
    def saved(step):
        ckpt = torch.load(tmp_path / "full" / f"step={step}.ckpt", weights_only=False)
        return next(v for k, v in ckpt["callbacks"].items() if "FederatedSimulation" in k)

    assert saved(4)["round"] == 1 and "in_round" not in saved(4)
    assert saved(5)["round"] == 1 and saved(5)["in_round"]["updates"] == []  # inside round 2, no client done yet
    for step in (4, 5):
        resumed, sim = _run(tmp_path / f"resumed{step}", ckpt_path=str(tmp_path / "full" / f"step={step}.ckpt"))
        assert sim.round == full_sim.round == 3
        assert [r["clients"] for r in sim.history] == [r["clients"] for r in full_sim.history]
        assert [r["bytes_up"] for r in sim.report()["per_round"]] == [
            r["bytes_up"] for r in full_sim.report()["per_round"]
        ]
        assert set(sim._global) == set(full_sim._global)  # the server still holds only the trainable tensors
        state, expected = resumed.state_dict(), full.state_dict()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, atol=1e-6, rtol=0, msg=name)
        for name, value in base.items():  # the frozen base bit-identical
            assert torch.equal(dict(resumed.named_parameters())[name], value), name
