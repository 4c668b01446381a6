"""``metrics.calibration``: Platt scaling against scikit-learn's, cross-fitting that never reads
an item's own label, and ECE and Brier against hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from vtrans.evaluation.metrics import calibration
from vtrans.latent.calibration import RIDGE


def _data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """p(error | s) = σ(2s − 1) exactly: a score whose Platt fit is the truth."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n)
    return s, (rng.random(n) < 1 / (1 + np.exp(-(2 * s - 1)))).astype(int)


def test_platt_is_scikit_learns_logistic_regression_on_the_standardised_score():
    """The same convex loss (the ridge RIDGE·n/2·a² is scikit-learn's C = 1/(RIDGE·n)); Newton's
    method converges to 1e-10 in the parameters, so 1e-6 on probabilities holds on any machine."""
    s, y = _data()
    z = ((s - s.mean()) / s.std()).reshape(-1, 1)
    reference = LogisticRegression(C=1 / (RIDGE * len(y)), tol=1e-12, max_iter=1000).fit(z, y)
    np.testing.assert_allclose(calibration.platt(s, y)(s), reference.predict_proba(z)[:, 1], atol=1e-6)


def test_a_score_that_separates_the_classes_still_gets_finite_probabilities_and_inf_ranks_last():
    s, y = np.arange(20.0), (np.arange(20) >= 10).astype(int)
    p = calibration.platt(s, y)(np.array([0.0, 19.0, np.inf, -np.inf]))
    assert np.isfinite(p).all() and p[0] < 0.1 < 0.9 < p[1] <= p[2] and p[3] <= p[0]
    with pytest.raises(ValueError, match="both"):
        calibration.platt(s, np.ones(20))


def test_cross_fitted_probabilities_never_read_their_own_fold():
    s, y = _data()
    folds = np.arange(len(s)) % 5
    before = calibration.cross_fitted(s, y, folds)
    flipped = y.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    after = calibration.cross_fitted(s, flipped, folds)
    np.testing.assert_array_equal(before[folds == 0], after[folds == 0])
    assert not np.allclose(before[folds == 1], after[folds == 1])


def test_a_calibrated_score_has_a_small_ece_and_a_constant_is_judged_by_hand():
    s, y = _data(n=20_000)
    p = calibration.cross_fitted(s, y, np.arange(len(s)) % 5)
    # the truth is in the model's family: what is left is sampling noise, about 0.01 at this n
    assert calibration.ece(p, y) < 0.03
    assert calibration.ece(1 / (1 + np.exp(-(2 * s - 1))), y) < 0.03
    assert calibration.ece(np.full(len(y), 0.95), y) > 0.3  # far too sure of errors
    # by hand: bins [0.1, 0.2) and [0.8, 0.9): |0.15 − 0.5|·2/4 + |0.85 − 1|·2/4
    p, e = np.array([0.15, 0.15, 0.85, 0.85]), np.array([0, 1, 1, 1])
    assert calibration.ece(p, e) == pytest.approx(0.35 * 0.5 + 0.15 * 0.5)
    assert calibration.brier(p, e) == pytest.approx((0.15**2 + 0.85**2 + 0.15**2 + 0.15**2) / 4)
    mean_p, rate, count = calibration.reliability(p, e)
    np.testing.assert_allclose(mean_p, [0.15, 0.85])
    np.testing.assert_allclose(rate, [0.5, 1.0])
    assert count.tolist() == [2, 2]
