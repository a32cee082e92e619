"""Federated test helpers: a user module with a stateless optimizer, state copies, and the check
that a callback's declared ``logged_keys``/``report_keys`` match what a real run produced."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from lightning_trust.demo import TabularMLP


class PlainSGDMLP(TabularMLP):
    """User code with a stateless optimizer (plain SGD)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _matches(pattern: str, name: str) -> bool:
    regex = "".join(".+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]+>)", pattern))
    return re.fullmatch(regex, name) is not None


def check_declared_keys(
    owner, report: Mapping, logged: Iterable[str], prefix: str = "federated/", optional: Iterable[str] = ()
) -> None:
    """Every top-level report key is declared and every declared one is present (but ``optional``
    ones, e.g. the DP keys of a run without DP); every logged ``prefix`` metric matches a declared pattern."""
    top = set(report) - {"figures"}
    assert not [k for k in top if not any(_matches(p, k) for p in owner.report_keys)], "undeclared report keys"
    missing = [p for p in owner.report_keys if p not in set(optional) and not any(_matches(p, k) for k in top)]
    assert not missing, f"declared keys missing: {missing}"
    names = [n for n in logged if n.startswith(prefix)]
    assert names, "the run logged nothing"
    undeclared = [n for n in names if not any(_matches(p, n) for p in owner.logged_keys)]
    assert not undeclared, f"undeclared logged metrics: {undeclared}"
