import contextlib

import pytest
import torch
from torch import nn

from lightning_trust.core import artifact_dir, isolated_eval, to_jsonable, unwrap_module
from lightning_trust.core.protocol import DuplicateSectionError, Pausable, Reportable, collect_reports


class _Pauser:
    report_section = "demo"

    def __init__(self):
        self.active = True
        self.pauses = 0

    @contextlib.contextmanager
    def paused(self):
        self.active = False
        self.pauses += 1
        try:
            yield
        finally:
            self.active = True

    def report(self):
        return {"value": 1.5}


class _Trainer:
    def __init__(self, callbacks, log_dir=None):
        self.callbacks = callbacks
        self.log_dir = log_dir


def test_isolated_eval_restores_everything_and_pauses():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2), nn.Linear(3, 1)).train()
    net[0].weight.requires_grad_(False)
    net[2].weight.grad = torch.full_like(net[2].weight, 7.0)
    pauser = _Pauser()
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    with isolated_eval(net, _Trainer([pauser]), grad=True) as m:
        assert not pauser.active and not m.training and torch.is_grad_enabled()
        assert net[2].weight.grad is None
        net[0].weight.requires_grad_(True)
        m(torch.randn(4, 3)).sum().backward()
        torch.rand(100)  # consumes random numbers
    assert pauser.active and pauser.pauses == 1
    assert net.training and net[1].training
    assert not net[0].weight.requires_grad
    assert torch.equal(net[2].weight.grad, torch.full_like(net[2].weight, 7.0))
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG did not move
    with isolated_eval(net) as m:
        assert not torch.is_grad_enabled()


def test_protocols_and_collect_reports(tmp_path):
    a, b = _Pauser(), _Pauser()
    assert isinstance(a, Pausable) and isinstance(a, Reportable)
    with pytest.raises(DuplicateSectionError, match=r"section 'demo'.*distinct `name`"):
        collect_reports(_Trainer([a, object(), b]))
    b.name = "demo_by_age"  # a user-given name: the section no longer depends on callback order
    assert collect_reports(_Trainer([b, object(), a])) == {"demo_by_age": {"value": 1.5}, "demo": {"value": 1.5}}
    folder = artifact_dir(_Trainer([], log_dir=str(tmp_path)), "privacy")
    assert folder == tmp_path / "lightning_trust" / "privacy" and folder.is_dir()


def test_to_jsonable_and_unwrap():
    import numpy as np

    assert to_jsonable({"a": torch.tensor(2.0), "b": np.float32(1.5), "c": [torch.ones(2)]}) == {
        "a": 2.0,
        "b": 1.5,
        "c": [[1.0, 1.0]],
    }
    inner = nn.Linear(2, 2)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self._module = inner

    assert unwrap_module(Wrapper()) is inner


def test_isolated_eval_relaxes_then_restores_determinism():
    net = nn.Sequential(nn.Linear(2, 2))
    torch.use_deterministic_algorithms(True)
    try:
        with isolated_eval(net, grad=True):
            assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
