"""The accounting functions, without a Trainer, against Opacus's accountants and get_noise_multiplier."""

import math

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from lightning_trust.privacy.accounting import (
    epsilon_of,
    extend_history,
    noise_for_epsilon,
    planned_steps,
    sample_rate_for,
    steps_of,
    steps_per_epoch,
    steps_within_budget,
)


def _opacus_epsilon(accountant, steps_at, delta):
    reference = create_accountant(accountant)
    for sigma, rate, steps in steps_at:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=rate)
    return reference.get_epsilon(delta=delta)


def test_sample_rate_and_steps_per_epoch_follow_opacus_dp_data_loader():
    assert sample_rate_for(240, 24) == pytest.approx(0.1)
    assert sample_rate_for(27146, 256, world_size=2) == pytest.approx(1 / 54)
    assert sample_rate_for(240, 24, accumulate=2) == pytest.approx(0.2)
    assert steps_per_epoch(1 / 54) == 54


def test_planned_steps_takes_the_tighter_trainer_limit():
    assert planned_steps(0.1, max_epochs=3) == 30
    assert planned_steps(0.1, max_steps=25, max_epochs=3) == 25
    assert planned_steps(0.1, max_steps=50, physical_parts=5) == 10  # virtual batches: 5 physical per noisy step
    assert planned_steps(0.1, max_steps=25, global_step=14) == 11  # a resumed run
    assert planned_steps(0.1, max_epochs=-1) is None and planned_steps(0.1, max_steps=-1) is None


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_of_a_history_is_opacus_epsilon(accountant):
    second = 1.1 if accountant == "gdp" else 0.9  # Opacus's GDP accountant takes one noise level only
    history = extend_history(extend_history([], 1.1, 0.1, 12), second, 0.1, 5)
    assert steps_of(history) == 17
    assert history == ([(1.1, 0.1, 17)] if accountant == "gdp" else [(1.1, 0.1, 12), (0.9, 0.1, 5)])
    assert epsilon_of(history, 1e-3, accountant) == pytest.approx(_opacus_epsilon(accountant, history, 1e-3), rel=1e-9)
    assert extend_history(history, second, 0.1, 3)[-1] == (second, 0.1, 8 if second == 0.9 else 20)  # merged
    assert epsilon_of([], 1e-3, accountant) == 0.0
    assert math.isinf(epsilon_of([(0.0, 0.1, 1)], 1e-3, accountant))


@pytest.mark.parametrize(("accountant", "tolerance"), [("rdp", 0.01), ("gdp", 0.01)])
def test_noise_for_epsilon_is_get_noise_multiplier(accountant, tolerance):
    sigma = noise_for_epsilon(2.0, 1e-3, 0.1, 30, accountant=accountant, epsilon_tolerance=tolerance)
    expected = get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=1e-3,
        sample_rate=0.1,
        steps=30,
        accountant=accountant,
        epsilon_tolerance=tolerance,
    )
    assert sigma == pytest.approx(expected)
    assert 2.0 - tolerance <= epsilon_of([(sigma, 0.1, 30)], 1e-3, accountant) <= 2.0


def test_noise_for_epsilon_refuses_what_cannot_be_reached_or_planned():
    with pytest.raises(ValueError, match="cannot be reached in 100 steps at sample rate 0.1"):
        noise_for_epsilon(1e-7, 1e-9, 0.1, 100, accountant="rdp")
    with pytest.raises(ValueError, match="needs a planned training length"):
        noise_for_epsilon(1.0, 1e-3, 0.1, None)


@pytest.mark.parametrize("accountant", ["rdp", "gdp"])
def test_budget_bisection_finds_the_last_step_within_the_limit(accountant):
    budget = _opacus_epsilon(accountant, [(1.0, 0.1, 7)], 1e-3) + 1e-9
    # from scratch, with a long plan and with no plan at all
    assert steps_within_budget([], 1.0, 0.1, 1e-3, accountant, budget, remaining=50) == 7
    assert steps_within_budget([], 1.0, 0.1, 1e-3, accountant, budget, remaining=None) == 7
    # continuing a history: the total counts the earlier steps
    assert steps_within_budget([(1.0, 0.1, 3)], 1.0, 0.1, 1e-3, accountant, budget, remaining=50) == 7
    # the limit does not bind within the plan, or there is none
    assert steps_within_budget([], 1.0, 0.1, 1e-3, accountant, budget, remaining=5) is None
    assert steps_within_budget([], 1.0, 0.1, 1e-3, accountant, None, remaining=5) is None
    # already at the budget, or no noise at all: no further step
    assert steps_within_budget([(1.0, 0.1, 7)], 1.0, 0.1, 1e-3, accountant, budget, remaining=50) == 7
    assert steps_within_budget([(1.0, 0.1, 2)], 0.0, 0.1, 1e-3, accountant, budget, remaining=50) == 2
