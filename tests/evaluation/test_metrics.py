"""Tests of vtrans.evaluation.metrics against scikit-learn, hand computations and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from vtrans.evaluation import metrics
from vtrans.evaluation.metrics import (
    METRICS,
    auprc,
    aurc,
    auroc,
    bootstrap,
    bootstrap_ci,
    counts,
    paired_bootstrap,
    prr,
    risk_coverage_curve,
    roc_curve,
    summarize,
)

# --------------------------------------------------------------------------- helpers


def _random_case(seed: int, n: int = 200, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores weakly related to errors; rounding creates ties."""
    rng = np.random.default_rng(seed)
    errors = rng.integers(0, 2, n)
    scores = rng.normal(size=n) + 0.8 * errors
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, errors


def _brute_force_risk(scores: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Risk curve averaged over every ordering of the items that sorts the scores ascending."""
    curves = []
    for order in itertools.permutations(range(len(scores))):
        if all(scores[a] <= scores[b] for a, b in itertools.pairwise(order)):
            kept_errors = np.cumsum(errors[list(order)])
            curves.append(kept_errors / np.arange(1, len(scores) + 1))
    return np.mean(curves, axis=0)


def _brute_force_aurc(scores: np.ndarray, errors: np.ndarray) -> float:
    return float(_brute_force_risk(scores, errors).mean())


def _brute_force_prr(scores: np.ndarray, errors: np.ndarray) -> float:
    error_rate = errors.mean()
    oracle = _brute_force_aurc(errors.astype(float), errors)  # errors ranked after every correct item
    return (error_rate - _brute_force_aurc(scores, errors)) / (error_rate - oracle)


# --------------------------------------------------------------------------- AUROC / AUPRC


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_auprc_match_sklearn_on_random_data(seed: int, decimals: int | None) -> None:
    scores, errors = _random_case(seed, decimals=decimals)
    assert auroc(scores, errors) == pytest.approx(roc_auc_score(errors, scores), abs=1e-6)
    assert auprc(scores, errors) == pytest.approx(average_precision_score(errors, scores), abs=1e-6)


@pytest.mark.parametrize(
    ("scores", "errors"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
        ([0.5, 0.5, 0.5, 0.2, 0.9], [1, 0, 1, 0, 0]),  # a tied group holding both classes
        ([1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 1, 1]),
        ([40.0, 50.0, 60.0, 70.0], [0, 1, 0, 1]),  # far outside [0, 1]: no sigmoid saturation
        ([-80.0, -60.0, 35.0, 90.0], [1, 0, 0, 1]),
    ],
)
def test_auroc_auprc_match_sklearn_on_hand_made_cases(scores: list[float], errors: list[int]) -> None:
    s, e = np.array(scores, dtype=float), np.array(errors)
    assert auroc(s, e) == pytest.approx(roc_auc_score(e, s), abs=1e-6)
    assert auprc(s, e) == pytest.approx(average_precision_score(e, s), abs=1e-6)


def test_auroc_hand_computed() -> None:
    # pairs (error, correct): (0.35 > 0.1) (0.35 < 0.4) (0.8 > 0.1) (0.8 > 0.4) -> 3/4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # one tied pair counts one half: (2 > 1) + (2 = 2)/2 -> 1.5 / 2
    assert auroc([1.0, 2.0, 2.0], [0, 0, 1]) == pytest.approx(0.75)


def test_auroc_extremes() -> None:
    errors = np.array([0, 0, 1, 1, 0, 1])
    assert auroc(errors * 3.0 + 1, errors) == pytest.approx(1.0)
    assert auroc(-errors * 3.0, errors) == pytest.approx(0.0)
    assert auroc(np.full(6, 2.5), errors) == pytest.approx(0.5)


def test_undefined_metrics_are_nan_without_exception() -> None:
    scores = np.array([0.2, 0.4, 0.9])
    for errors in ([0, 0, 0], [1, 1, 1]):
        assert math.isnan(auroc(scores, errors))
        assert math.isnan(prr(scores, errors))
    assert math.isnan(auprc(scores, [0, 0, 0]))
    assert auprc(scores, [1, 1, 1]) == pytest.approx(1.0)
    assert all(math.isnan(m([], [])) for m in METRICS.values())


def test_torch_and_numpy_inputs_agree() -> None:
    scores, errors = _random_case(3, n=50, decimals=1)
    for metric in METRICS.values():
        from_torch = metric(torch.tensor(scores, dtype=torch.float32), torch.tensor(errors).bool())
        assert from_torch == pytest.approx(metric(scores.astype(np.float32), errors), abs=1e-9)


@pytest.mark.parametrize(
    ("scores", "errors", "message"),
    [
        ([0.1, 0.2], [0, 1, 1], "same length"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2], [0, 2], "only 0"),
    ],
)
def test_bad_inputs_are_rejected(scores: list, errors: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auroc(scores, errors)


def test_roc_curve_matches_sklearn() -> None:
    scores, errors = _random_case(4, n=80, decimals=1)
    fpr, tpr = roc_curve(scores, errors)
    sk_fpr, sk_tpr, _ = sk_roc_curve(errors, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, errors), abs=1e-6)


# --------------------------------------------------------------------------- AURC / PRR


def test_aurc_and_prr_hand_computed() -> None:
    scores, errors = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1])
    # most confident first: errors 0, 1, 0, 1 -> risks 0/1, 1/2, 1/3, 2/4
    score_aurc = (0 + 1 / 2 + 1 / 3 + 2 / 4) / 4
    assert aurc(scores, errors) == pytest.approx(score_aurc)
    # oracle order 0, 0, 1, 1 -> risks 0, 0, 1/3, 2/4; random = error rate = 1/2
    oracle_aurc = (0 + 0 + 1 / 3 + 2 / 4) / 4
    assert prr(scores, errors) == pytest.approx((0.5 - score_aurc) / (0.5 - oracle_aurc))
    assert prr(scores, errors) == pytest.approx(4 / 7)


def test_aurc_ties_enter_together() -> None:
    # the tied pair (0.2, 0.2) holds one error: at k = 2 the expected risk is (0 + 1/2) / 2
    scores, errors = np.array([0.1, 0.2, 0.2, 0.4]), np.array([0, 1, 0, 1])
    coverage, risk = risk_coverage_curve(scores, errors)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 4, 1 / 3, 1 / 2])
    assert aurc(scores, errors) == pytest.approx((0 + 1 / 4 + 1 / 3 + 1 / 2) / 4)
    # the result does not depend on the order of the items in the input
    perm = [2, 0, 3, 1]
    assert aurc(scores[perm], errors[perm]) == pytest.approx(aurc(scores, errors))


def test_constant_score_has_the_random_aurc() -> None:
    errors = np.array([1, 0, 0, 1, 1, 0, 0, 0])
    assert aurc(np.zeros(8), errors) == pytest.approx(errors.mean())
    assert prr(np.zeros(8), errors) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1)), min_size=1, max_size=6),
)
def test_aurc_and_prr_match_brute_force(items: list[tuple[int, int]]) -> None:
    scores = np.array([s for s, _ in items], dtype=float)
    errors = np.array([e for _, e in items])
    assert aurc(scores, errors) == pytest.approx(_brute_force_aurc(scores, errors), abs=1e-12)
    np.testing.assert_allclose(risk_coverage_curve(scores, errors)[1], _brute_force_risk(scores, errors))
    if 0 < errors.sum() < len(errors):
        assert prr(scores, errors) == pytest.approx(_brute_force_prr(scores, errors), abs=1e-12)
    else:
        assert math.isnan(prr(scores, errors))


def test_prr_oracle_random_and_reversed() -> None:
    rng = np.random.default_rng(0)
    errors = rng.integers(0, 2, 300)
    assert prr(errors + rng.uniform(0, 0.5, 300), errors) == pytest.approx(1.0)
    shuffled = [prr(rng.permutation(300).astype(float), errors) for _ in range(300)]
    assert abs(np.mean(shuffled)) < 0.03
    assert prr(-errors + rng.uniform(0, 0.5, 300), errors) < -0.5


def test_risk_coverage_curve_ends_at_the_error_rate_and_averages_to_aurc() -> None:
    scores, errors = _random_case(5, n=120, decimals=1)
    coverage, risk = risk_coverage_curve(scores, errors)
    assert coverage[-1] == pytest.approx(1.0)
    assert risk[-1] == pytest.approx(errors.mean())
    assert risk.mean() == pytest.approx(aurc(scores, errors))


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("name", list(METRICS))
def test_vectorised_metrics_equal_the_point_estimates_on_resamples(name: str) -> None:
    metric = METRICS[name]
    scores, errors = _random_case(6, n=60, decimals=1)
    idx = np.random.default_rng(0).integers(0, 60, size=(40, 60))
    gid, n_groups = counts._group_ids(scores)
    vectorised = bootstrap._FROM_COUNTS[metric](*counts._group_counts(gid, errors, n_groups, idx))
    one_by_one = [metric(scores[row], errors[row]) for row in idx]
    np.testing.assert_allclose(vectorised, one_by_one, atol=1e-6)


def test_vectorised_auroc_equals_torchmetrics_and_sklearn() -> None:
    scores, errors = _random_case(7, n=500, decimals=2)
    gid, n_groups = counts._group_ids(scores)
    vectorised = counts._auroc_from_counts(*counts._group_counts(gid, errors, n_groups))[0]
    torch.testing.assert_close(vectorised, auroc(scores, errors), rtol=0, atol=1e-6)
    torch.testing.assert_close(vectorised, roc_auc_score(errors, scores), rtol=0, atol=1e-12)


def test_bootstrap_vectorised_and_per_resample_paths_agree() -> None:
    scores, errors = _random_case(8, n=80)
    fast = bootstrap_ci(auroc, scores, errors, n_boot=100, seed=3)
    slow = bootstrap_ci(lambda s, e: auroc(s, e), scores, errors, n_boot=100, seed=3)
    np.testing.assert_allclose(fast, slow, atol=1e-6)


@pytest.mark.parametrize("name", list(METRICS))
def test_bootstrap_ci_contains_the_point_estimate(name: str) -> None:
    scores, errors = _random_case(9, n=300)
    lo, hi = bootstrap_ci(METRICS[name], scores, errors, n_boot=300)
    assert lo < METRICS[name](scores, errors) < hi


def test_bootstrap_is_deterministic_with_the_seed() -> None:
    scores, errors = _random_case(10, n=100)
    assert bootstrap_ci(auroc, scores, errors, seed=1) == bootstrap_ci(auroc, scores, errors, seed=1)
    assert bootstrap_ci(auroc, scores, errors, seed=1) != bootstrap_ci(auroc, scores, errors, seed=2)


def test_bootstrap_skips_undefined_resamples() -> None:
    scores = np.arange(10.0)
    errors = np.array([0] * 9 + [1])  # one error: about a third of the resamples miss it
    lo, hi = bootstrap_ci(auroc, scores, errors, n_boot=200)
    assert 0 <= lo <= hi <= 1
    assert all(math.isnan(x) for x in bootstrap_ci(auroc, scores, np.zeros(10, dtype=int), n_boot=20))


def test_paired_bootstrap_of_identical_scores_is_zero() -> None:
    scores, errors = _random_case(11, n=100)
    out = paired_bootstrap(auroc, scores, scores.copy(), errors, n_boot=200)
    assert out == {"delta": 0.0, "ci": [0.0, 0.0], "p_value": 1.0}


def test_paired_bootstrap_detects_a_better_estimator() -> None:
    rng = np.random.default_rng(12)
    errors = rng.integers(0, 2, 200)
    good = errors + rng.normal(0, 0.5, 200)
    noise = rng.normal(size=200)
    out = paired_bootstrap(auroc, good, noise, errors, n_boot=500)
    assert out["delta"] == pytest.approx(auroc(good, errors) - auroc(noise, errors))
    assert 0 < out["ci"][0] <= out["delta"] <= out["ci"][1]
    assert out["p_value"] < 0.01
    reverse = paired_bootstrap(auroc, noise, good, errors, n_boot=500)
    assert reverse["ci"][1] < 0
    assert reverse["p_value"] == out["p_value"]


def test_summarize_returns_python_floats() -> None:
    scores, errors = _random_case(13, n=100)
    out = summarize(scores, errors, n_boot=100)
    assert list(out) == ["auroc", "auroc_ci", "auprc", "prr", "aurc"]
    assert all(type(out[k]) is float for k in ("auroc", "auprc", "prr", "aurc"))
    assert len(out["auroc_ci"]) == 2 and all(type(x) is float for x in out["auroc_ci"])
    assert out["auroc_ci"][0] < out["auroc"] < out["auroc_ci"][1]


# --------------------------------------------------------------------------- scored items, spread over seeds


def test_scored_drops_the_items_without_a_score_and_keeps_inf() -> None:
    scores = torch.tensor([0.3, float("nan"), float("inf"), 0.1], dtype=torch.float64)
    s, e = metrics.scored(scores, [1, 0, 1, 0])
    np.testing.assert_array_equal(s, [0.3, np.inf, 0.1])
    np.testing.assert_array_equal(e, [1, 1, 0])
    assert auroc(s, e) == roc_auc_score([1, 1, 0], [0.3, 1e300, 0.1])
    empty = metrics.scored([float("nan")], [1])
    assert empty[0].size == 0 and math.isnan(auroc(*empty))


def test_spread_is_numpys_mean_and_sample_sd_over_the_finite_values() -> None:
    values = [0.71, 0.64, float("nan"), 0.69]
    out = metrics.spread(values)
    assert out["mean"] == pytest.approx(np.mean([0.71, 0.64, 0.69]), abs=0, rel=1e-15)
    assert out["sd"] == pytest.approx(np.std([0.71, 0.64, 0.69], ddof=1), abs=0, rel=1e-15)
    one = metrics.spread([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["sd"])  # one seed: no spread to speak of
    assert all(math.isnan(v) for v in metrics.spread([float("nan")]).values())


def test_resampled_values_are_the_metric_on_the_resamples_that_pair_two_estimators():
    """Row r of two estimators' resampled AUROCs is on the same items: their difference is the
    paired bootstrap's. The counts are exact in float64; ``metrics.auroc`` on one resample runs
    torchmetrics in float32, whose rounding (a few 1e-8 at 120 items) 1e-6 covers."""
    rng = np.random.default_rng(5)
    errors = rng.random(120) < 0.4
    a, b = rng.random(120) + errors, rng.integers(0, 4, 120).astype(float)
    va, vb = metrics.resampled_values(metrics.auroc, a, errors, 50, seed=3), metrics.resampled_values(metrics.auroc, b, errors, 50, seed=3)
    idx = np.random.default_rng(3).integers(0, 120, size=(50, 120))
    np.testing.assert_allclose(va, [metrics.auroc(a[i], errors[i]) for i in idx], atol=1e-6)
    lo, hi = np.percentile(va - vb, [2.5, 97.5])
    assert metrics.paired_bootstrap(metrics.auroc, a, b, errors, n_boot=50, seed=3)["ci"] == pytest.approx([lo, hi], abs=1e-12)
