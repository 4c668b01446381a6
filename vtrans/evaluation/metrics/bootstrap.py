"""How sure a metric is: percentile bootstrap intervals, the paired bootstrap of a difference, the
spread over seeds, and every metric of one estimator with its interval (:func:`summarize`).

The four metrics of :data:`vtrans.evaluation.metrics.ranking.METRICS` run vectorised over the
resample matrix (``vtrans.evaluation.metrics.counts``); any other callable is called once per resample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from vtrans.evaluation.metrics.counts import (
    _auprc_from_counts,
    _aurc_from_counts,
    _auroc_from_counts,
    _group_counts,
    _group_ids,
    _prr_from_counts,
)
from vtrans.evaluation.metrics.ranking import (
    ArrayLike,
    Metric,
    _as_arrays,
    _to_numpy,
    auprc,
    aurc,
    auroc,
    prr,
)

# Upper bound on the number of elements of one resample matrix (bounds memory:
# 2**22 int64 indices = 32 MiB); larger bootstraps run in chunks.
_MAX_RESAMPLE_ELEMENTS = 1 << 22

# The vectorised version of each public metric, used by the bootstrap.
_FROM_COUNTS: dict[Metric, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    auroc: _auroc_from_counts,
    auprc: _auprc_from_counts,
    aurc: _aurc_from_counts,
    prr: _prr_from_counts,
}


def _resample_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (chunk, n) matrices of item indices drawn with replacement, n_boot rows in all."""
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_RESAMPLE_ELEMENTS // max(n, 1))
    done = 0
    while done < n_boot:
        rows = min(rows_per_chunk, n_boot - done)
        yield rng.integers(0, n, size=(rows, n))  # (rows, n)
        done += rows


def _resampled_values(metric: Metric, s: np.ndarray, e: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The metric on each of ``n_boot`` resamples (NaN kept); same indices for the same seed and n."""
    if s.size == 0:
        return np.full(n_boot, np.nan)
    from_counts = _FROM_COUNTS.get(metric)
    gid, n_groups = _group_ids(s)
    values = []
    for idx in _resample_indices(s.size, n_boot, seed):
        if from_counts is not None:
            values.append(from_counts(*_group_counts(gid, e, n_groups, idx)))
        else:
            values.append(np.array([metric(s[row], e[row]) for row in idx], dtype=np.float64))
    return np.concatenate(values)


def resampled_values(metric: Metric, scores: ArrayLike, errors: ArrayLike, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """The metric on each of ``n_boot`` resamples of the items (NaN kept). The same ``seed`` and
    number of items draw the same resamples, so that two estimators' values pair row by row (a
    difference of means over seeds, say)."""
    s, e = _as_arrays(scores, errors)
    return _resampled_values(metric, s, e, n_boot, seed)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval of the finite values, (NaN, NaN) if there are none."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    metric: Metric,
    scores: ArrayLike,
    errors: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric.

    Items are resampled with replacement; resamples on which the metric is
    undefined (NaN, e.g. a single class) are skipped. The four metrics of
    :data:`METRICS` run vectorised over the resample matrix; any other callable
    is called once per resample.

    Args:
        metric: a function ``(scores, errors) -> float``.
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.
        n_boot: number of resamples.
        alpha: 1 - confidence level.
        seed: seed of the numpy Generator that draws the resamples.

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` if no resample gives a value.
    """
    s, e = _as_arrays(scores, errors)
    return _percentile_ci(_resampled_values(metric, s, e, n_boot, seed), alpha)


def paired_bootstrap(
    metric: Metric,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    errors: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    comparisons: int | None = None,
) -> dict[str, Any]:
    """Paired bootstrap of the difference ``metric(a) - metric(b)`` on the same items.

    Both estimators are evaluated on the same resampled indices. Resamples where
    either value is NaN are skipped.

    Args:
        metric: a function ``(scores, errors) -> float``.
        scores_a: scores of estimator A.
        scores_b: scores of estimator B, same items as A.
        errors: 1 = incorrect completion.
        n_boot: number of resamples.
        seed: seed of the numpy Generator that draws the resamples.
        alpha: 1 - confidence level of the interval.
        comparisons: with m comparisons, add ``"corrected_ci"``: the Bonferroni-corrected interval
            (level 1 - alpha/m) from the same resampled deltas.

    Returns:
        ``{"delta": float, "ci": [lo, hi], "p_value": float}`` (and ``"corrected_ci"``). The p-value is
        twice the fraction of resampled deltas that do not share the sign of
        ``delta`` (zero counts as opposite), capped at 1; it is 1 when
        ``delta`` is 0 and NaN when ``delta`` is undefined.
    """
    a, e = _as_arrays(scores_a, errors)
    b, _ = _as_arrays(scores_b, errors)
    delta = metric(a, e) - metric(b, e)
    boot = _resampled_values(metric, a, e, n_boot, seed) - _resampled_values(metric, b, e, n_boot, seed)
    boot = boot[~np.isnan(boot)]
    lo, hi = _percentile_ci(boot, alpha)
    if np.isnan(delta) or boot.size == 0:
        p_value = float("nan")
    elif delta == 0:
        p_value = 1.0
    else:
        opposite = np.mean(boot <= 0) if delta > 0 else np.mean(boot >= 0)
        p_value = float(min(1.0, 2 * opposite))
    out = {"delta": float(delta), "ci": [lo, hi], "p_value": p_value}
    if comparisons is not None:
        out["corrected_ci"] = list(_percentile_ci(boot, alpha / max(comparisons, 1)))
    return out


def spread(values: ArrayLike) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1) of a metric's values over runs (seeds).

    NaN values (a run where the metric is undefined) are left out. Returns ``{"mean", "sd"}``:
    the mean is NaN without a finite value, the sd NaN with fewer than two.
    """
    v = _to_numpy(values).astype(np.float64, copy=False)
    finite = int(np.isfinite(v).sum())
    mean = float(np.nanmean(v)) if finite else float("nan")
    sd = float(np.nanstd(v, ddof=1)) if finite > 1 else float("nan")
    return {"mean": mean, "sd": sd}


def summarize(scores: ArrayLike, errors: ArrayLike, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All metrics of one estimator, with a bootstrap 95% CI for AUROC.

    Args:
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.
        n_boot: number of bootstrap resamples for the AUROC interval.
        seed: bootstrap seed.

    Returns:
        ``{"auroc", "auroc_ci": [lo, hi], "auprc", "prr", "aurc"}`` as python floats.
    """
    s, e = _as_arrays(scores, errors)
    out: dict[str, Any] = {"auroc": auroc(s, e)}
    out["auroc_ci"] = list(bootstrap_ci(auroc, s, e, n_boot=n_boot, seed=seed))
    out.update(auprc=auprc(s, e), prr=prr(s, e), aurc=aurc(s, e))
    return out
