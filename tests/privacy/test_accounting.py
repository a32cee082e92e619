import math

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from lightning_trust.privacy import DifferentialPrivacy
from tests.privacy.helpers import TinyData, TinyModule, trainer


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_epsilon_equals_opacus_accountant(tmp_path, accountant):
    dp = DifferentialPrivacy(
        noise_multiplier=1.1, target_delta=1e-3, accountant=accountant, max_grad_norm=0.8, log_every_n_steps=5
    )
    t = trainer(tmp_path, max_epochs=2, callbacks=[dp])
    t.fit(TinyModule(), TinyData(n=240, batch_size=24))

    assert dp.sample_rate == pytest.approx(0.1)  # 1 / ceil(240 / 24)
    assert dp.steps == 20 == t.global_step  # int(1 / q) Poisson batches per epoch, one noisy step each
    reference = create_accountant(accountant)
    for _ in range(20):
        reference.step(noise_multiplier=1.1, sample_rate=0.1)
    expected = reference.get_epsilon(delta=1e-3)
    assert abs(dp.epsilon_spent - expected) < 1e-6
    report = dp.report()
    assert abs(report["epsilon"] - expected) < 1e-6
    assert report["accountant"] == accountant and report["steps"] == 20 and report["sampling"] == "poisson"
    assert report["noise_multiplier"] == 1.1 and report["max_grad_norm"] == 0.8 and report["delta"] == 1e-3
    # the value logged through the Trainer's loggers is the accountant's
    assert float(t.callback_metrics["privacy/epsilon"]) == pytest.approx(expected, rel=1e-6)
    assert float(t.callback_metrics["privacy/noise_multiplier"]) == pytest.approx(1.1)
    assert float(t.callback_metrics["privacy/delta"]) == pytest.approx(1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("accountant", "tolerance"), [("prv", 0.05), ("rdp", 0.01), ("gdp", 0.01)])
def test_noise_for_target_epsilon_reaches_it(tmp_path, accountant, tolerance):
    dp = DifferentialPrivacy(target_epsilon=2.0, target_delta=1e-3, accountant=accountant, epsilon_tolerance=tolerance)
    t = trainer(tmp_path, max_epochs=3, callbacks=[dp])
    t.fit(TinyModule(), TinyData(n=240, batch_size=24))
    assert dp.planned_steps == 30 == dp.steps
    expected_sigma = get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=1e-3,
        sample_rate=0.1,
        steps=30,
        accountant=accountant,
        epsilon_tolerance=tolerance,
    )
    assert dp.noise_multiplier == pytest.approx(expected_sigma)
    # within Opacus's tolerance below the target, never above it
    assert 2.0 - tolerance <= dp.epsilon_spent <= 2.0
    assert not dp.stopped_at_budget


def test_default_delta_is_one_over_n(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    trainer(tmp_path, max_steps=2, callbacks=[dp]).fit(TinyModule(), TinyData(n=240, batch_size=24))
    assert dp.delta == pytest.approx(1 / 240)
    assert dp.report()["dataset_size"] == 240


def test_epsilon_curve_figure_and_json(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, target_delta=1e-3, log_every_n_steps=5)
    trainer(tmp_path, max_epochs=2, callbacks=[dp]).fit(TinyModule(), TinyData())
    report = dp.report()
    assert [s for s, _ in report["epsilon_curve"]] == [5, 10, 15, 20]
    eps = [e for _, e in report["epsilon_curve"]]
    assert eps == sorted(eps) and math.isclose(eps[-1], dp.epsilon_spent)
    figure = report["figures"]["epsilon_curve"]
    assert figure.endswith(".png") and (tmp_path / "lightning_trust/privacy/epsilon_curve.png").exists()
    assert (tmp_path / "lightning_trust/privacy/privacy.json").exists()
