"""``vtrans.latent.calibration``: the map a latent carries from its recommended score to ``p_wrong``.

Its isotonic fit against scikit-learn's, the choice between Platt and isotonic by held-out Brier
score, what is refused, and the record it is saved as."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from vtrans.latent import calibration


def test_isotonic_is_scikit_learns_on_tied_scores():
    """Both are the pool-adjacent-violators fit of the same weighted points, so they agree to
    rounding (1e-12 holds on any machine: sums of at most 300 numbers in [0, 1])."""
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)  # many ties
    y = (rng.random(300) < 1 / (1 + np.exp(-3 * s))).astype(float)
    params = calibration.fit_isotonic(s, y)
    reference = IsotonicRegression(out_of_bounds="clip").fit(s, y)
    probe = np.linspace(-4, 4, 101)
    np.testing.assert_allclose(calibration.predict("isotonic", params, probe), reference.predict(probe), atol=1e-12)
    assert np.all(np.diff(params["x"]) > 0) and np.all(np.diff(params["y"]) >= 0)


def test_infinite_and_missing_scores_read_as_the_most_uncertain():
    s, y = np.arange(40.0), (np.arange(40) % 3 == 0) | (np.arange(40) > 25)
    for fitted in (calibration.fit(s, y), calibration.Calibration("x", "platt", calibration.fit_platt(s, y), 40, 1)):
        p = fitted(np.array([-np.inf, 0.0, 39.0, np.inf, np.nan]))
        assert np.isfinite(p).all() and p[0] == p[1] and p[3] == p[4] == p[2]


def test_a_step_in_the_error_rate_chooses_isotonic_a_smooth_one_platt():
    """A 0/1 jump is what isotonic fits and a sigmoid cannot; a logistic truth on 600 items is Platt's."""
    rng = np.random.default_rng(1)
    s = rng.normal(size=200)
    step = calibration.fit(s, (s > 0.3).astype(float))
    assert isinstance(step, calibration.Calibration) and step.method == "isotonic"
    assert step.cv_brier["isotonic"] < step.cv_brier["platt"]
    s = rng.normal(size=600)
    smooth = calibration.fit(s, (rng.random(600) < 1 / (1 + np.exp(-(1.5 * s - 0.5)))).astype(float))
    assert isinstance(smooth, calibration.Calibration) and smooth.method == "platt"
    assert smooth.cv_brier["platt"] <= smooth.cv_brier["isotonic"]


def test_the_map_is_refitted_on_every_item_after_the_choice():
    rng = np.random.default_rng(2)
    s = rng.normal(size=120)
    y = (rng.random(120) < 1 / (1 + np.exp(-2 * s))).astype(float)
    fitted = calibration.fit(s, y, step=7)
    assert (fitted.n, fitted.n_wrong, fitted.step) == (120, int(y.sum()), 7)
    direct = calibration.fit_platt(s, y) if fitted.method == "platt" else calibration.fit_isotonic(s, y)
    assert fitted.params == direct


@pytest.mark.parametrize("n, wrong", [(19, 9), (40, 4), (40, 36)])
def test_too_few_items_or_of_a_class_fit_nothing_and_say_why(n, wrong):
    y = np.r_[np.ones(wrong), np.zeros(n - wrong)]
    why = calibration.fit(np.arange(n, dtype=float), y)
    assert isinstance(why, str) and f"{n} items, {wrong} wrong" in why


def test_the_record_round_trips_through_json_and_a_damaged_one_is_refused():
    rng = np.random.default_rng(3)
    s = rng.normal(size=100)
    fitted = calibration.fit(s, (s + rng.normal(size=100) > 0).astype(float))
    back = calibration.Calibration.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert back == fitted and np.array_equal(back(s), fitted(s))
    with pytest.raises(ValueError, match="not a calibration record"):
        calibration.Calibration.from_dict({**fitted.to_dict(), "method": "beta"})
    with pytest.raises(ValueError, match="not a calibration record"):
        calibration.Calibration.from_dict({"estimator": "adapter_nll"})


def test_the_record_says_the_answers_length_it_was_fitted_on():
    rng = np.random.default_rng(4)
    s = rng.normal(size=100)
    y = (s + rng.normal(size=100) > 0).astype(float)
    two = calibration.fit(s, y, answer_words=2)
    assert two.answer_words == 2
    assert calibration.Calibration.from_dict(json.loads(json.dumps(two.to_dict()))).answer_words == 2
    # a record saved before answers had a length is of one-word answers
    old = {k: v for k, v in calibration.fit(s, y).to_dict().items() if k != "answer_words"}
    assert calibration.Calibration.from_dict(old).answer_words == 1
