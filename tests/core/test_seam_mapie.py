"""MAPIE's conformal quantile through the seam, against the public conformity scores."""

import math

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier

from lightning_trust.core.seam import mapie_quantile
from lightning_trust.evaluation.conformal import GivenProbabilities


def _conformalized(score):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=300)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    model = SplitConformalClassifier(
        GivenProbabilities(4).fit(), confidence_level=0.8, conformity_score=score, prefit=True, random_state=0
    ).conformalize(probs, labels)
    model.predict_set(probs[:1])
    return model, probs


def test_lac_quantile_is_the_order_statistic_of_the_public_scores():
    model, probs = _conformalized("lac")
    scores = np.sort(np.asarray(model.conformity_scores).reshape(-1))
    q = mapie_quantile(model)
    assert q == pytest.approx(scores[math.ceil(301 * 0.8) - 1])
    np.testing.assert_array_equal(model.predict_set(probs)[1][:, :, 0], probs >= 1 - q - 1e-12)


def test_raps_quantile_is_finite_and_read_after_predicting():
    model, _ = _conformalized("raps")
    assert 0 < mapie_quantile(model) < 2  # a regularized cumulative mass
