"""The distillation teacher survives a checkpoint: a recovery killed and resumed distills from the
same dense teacher and ends with the same weights as an uninterrupted one."""

import pytest
import torch

from lightning_trust.compression import ProgressivePruning
from tests.compression.resume_runs import run


@pytest.mark.slow
def test_kill_and_resume_during_distilled_recovery_ends_like_an_uninterrupted_run(tmp_path):
    def pruning():
        return ProgressivePruning(pruning_ratio=0.5, schedule="one_shot", start_epoch=0, measure_latency=False,
                                  evaluate=False, distill={"temperature": 2.0, "weight": 0.5})  # fmt: skip

    full, full_cb = run(tmp_path, "full", pruning)
    run(tmp_path, "killed", pruning, kill=1)  # killed in the second recovery epoch, after the epoch-0 checkpoint
    checkpoint = torch.load(tmp_path / "killed" / "epoch=0.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ProgressivePruning")]
    assert state["distillation"]["teacher"] and state["distillation"]["steps"] == 1  # the pruning batch is not
    resumed, resumed_cb = run(tmp_path, "resumed", pruning, ckpt_path=tmp_path / "killed" / "epoch=0.ckpt")
    teacher, dense = resumed_cb.distill.teacher, full_cb.distill.teacher
    assert (
        teacher.model.config.hidden_size == 32 and resumed.model.config.hidden_size == 16
    )  # dense teacher, pruned student
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), dense.state_dict().values()))
    assert resumed_cb.distill.steps == full_cb.distill.steps == 3 * 2 - 1
    assert resumed_cb.report()["distillation"]["last_loss"] == pytest.approx(
        full_cb.report()["distillation"]["last_loss"]
    )
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
