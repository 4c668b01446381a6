"""Selective-prediction metrics for "is this completion wrong?".

Conventions shared by every function here:

- ``scores``: a 1-D float array, **higher = more uncertain**. NaN is rejected
  (drop those items first); ``inf`` is allowed and simply ranks last.
- ``errors``: a 1-D 0/1 (int or bool) array of the same length, **1 = incorrect
  completion**.
- Inputs may be numpy arrays, torch tensors or sequences; they are converted
  once by :func:`_as_arrays`.
- A metric that is undefined on its input (one class only, no items) returns
  NaN instead of raising, so that bootstrap resamples can simply be skipped.

Ties in ``scores`` are handled exactly and deterministically everywhere:

- AUROC counts a tied (error, correct) pair as one half (Mann-Whitney with
  mid-ranks), which is what the ROC trapezoid over distinct thresholds gives.
- AUPRC (average precision) moves through distinct thresholds only, as
  scikit-learn and torchmetrics do.
- AURC: items with equal scores enter the covered set together. Within a tied
  group the risk at coverage ``k/n`` is its expectation over all orderings of
  the group, i.e. the group's errors are spread evenly over its positions.
  Constant scores therefore give AURC = error rate, the same as a random score.

The point estimates of AUROC and AUPRC come from torchmetrics. The bootstrap
uses vectorised numpy versions of all four metrics, computed from the counts
of errors and correct items per group of tied scores (one ``np.bincount`` over
the resample matrix, no sort per resample); the tests check that they agree
with torchmetrics and with scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

__all__ = [
    "METRICS",
    "auprc",
    "auroc",
    "aurc",
    "bootstrap_ci",
    "paired_bootstrap",
    "prr",
    "risk_coverage_curve",
    "roc_curve",
    "scored",
    "spread",
    "summarize",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]
Metric = Callable[[ArrayLike, ArrayLike], float]

# Upper bound on the number of elements of one resample matrix (bounds memory:
# 2**22 int64 indices = 32 MiB); larger bootstraps run in chunks.
_MAX_RESAMPLE_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- inputs


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_arrays(scores: ArrayLike, errors: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert the two inputs.

    Args:
        scores: 1-D uncertainty scores, higher = more uncertain.
        errors: 1-D 0/1 labels, 1 = incorrect completion.

    Returns:
        ``(scores, errors)`` as float64 and int64 arrays of equal length.

    Raises:
        ValueError: on a shape mismatch, NaN scores or labels other than 0/1.
    """
    s = _to_numpy(scores).astype(np.float64, copy=False)
    e = _to_numpy(errors)
    if s.ndim != 1 or e.ndim != 1 or s.shape != e.shape:
        raise ValueError(
            f"scores and errors must be 1-D arrays of the same length, got shapes {s.shape} and {e.shape}"
        )
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: drop those items before computing a metric")
    if e.dtype != np.bool_ and not np.isin(e, (0, 1)).all():
        raise ValueError("errors must contain only 0 (correct) and 1 (incorrect)")
    return s, e.astype(np.int64)


def scored(scores: ArrayLike, errors: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The items an estimator scored: ``(scores, errors)`` without the items whose score is NaN.

    An estimator that cannot score an item records NaN; every metric here refuses NaN, so
    each estimator is measured on the items it scored (and reports how many).
    """
    s = _to_numpy(scores).astype(np.float64, copy=False)
    e = _to_numpy(errors)
    keep = ~np.isnan(s)
    return s[keep], e[keep]


def _order_preserving_unit(s: np.ndarray) -> np.ndarray:
    """Map scores onto [0, 1] keeping their order and ties exactly.

    torchmetrics treats predictions outside [0, 1] as logits and applies a
    sigmoid, which saturates (scores of 40 and 50 nats would become tied).
    Dense ranks scaled to [0, 1] avoid that without changing any rank metric.
    """
    gid, n_groups = _group_ids(s)
    return gid / (n_groups - 1) if n_groups > 1 else np.zeros_like(s)


def _both_classes(e: np.ndarray) -> bool:
    """Whether the labels contain at least one error and one correct item."""
    n_err = int(e.sum())
    return 0 < n_err < e.size


# --------------------------------------------------------------------------- group counts
# Every metric here depends on the scores only through their order and ties.
# So each metric is computed from the counts of errors P and correct items N in
# each group of equal scores, groups in ascending score order. A bootstrap
# resample is just another set of counts: one ``np.bincount`` over the resample
# matrix, with no sorting per resample. Each ``_*_from_counts`` takes (B, G)
# matrices (one row per resample) and returns (B,) values, NaN where undefined.


def _group_ids(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Index of each item's group of equal scores (groups in ascending order) and the number of groups."""
    unique, inverse = np.unique(s, return_inverse=True)
    return inverse.reshape(-1), unique.size


def _group_counts(
    gid: np.ndarray, e: np.ndarray, n_groups: int, idx: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Errors and correct items per score group, for each row of a resample matrix.

    Args:
        gid: (n,) group index of each item.
        e: (n,) 0/1 errors.
        n_groups: number of groups.
        idx: (B, n) item indices of B resamples; None for the items themselves.

    Returns:
        ``(P, N)``: two (B, n_groups) float arrays of error and correct counts.
    """
    if idx is None:
        idx = np.arange(gid.size)[None]  # (1, n)
    n_rows = idx.shape[0]
    item_key = gid * 2 + e  # (n,) group and label of each item in one integer
    key = np.arange(n_rows)[:, None] * (n_groups * 2) + item_key[idx]  # (B, n)
    counts = np.bincount(key.ravel(), minlength=n_rows * n_groups * 2).reshape(n_rows, n_groups, 2)
    return counts[..., 1].astype(np.float64), counts[..., 0].astype(np.float64)


def _harmonic(n: int) -> np.ndarray:
    """``H[k] = sum_{i=1..k} 1/i`` for k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC: P(error scores higher) + 1/2 P(tie)."""
    neg_below = np.cumsum(neg, axis=1) - neg  # (B, G) correct items with a lower score
    u = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = u / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), out, np.nan)


def _auprc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision: sum over thresholds (high to low) of ΔRecall x precision."""
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]  # (B, G) errors scoring >= this group
    flagged = np.cumsum((pos + neg)[:, ::-1], axis=1)[:, ::-1]  # (B, G) items scoring >= this group
    precision = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
    n_pos = pos.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (pos * precision).sum(axis=1) / n_pos
    return np.where(n_pos > 0, ap, np.nan)


def _group_risk_terms(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per group: error fraction p, items before C and errors before E (ascending order).

    Inside a group of m items entered after C items holding E errors, the
    expected risk at ``k = C + j`` is ``(E + j p) / (C + j) = p + (E - p C) / k``.
    """
    size = pos + neg
    p = np.divide(pos, size, out=np.zeros_like(pos), where=size > 0)
    before = np.cumsum(size, axis=1) - size
    errors_before = np.cumsum(pos, axis=1) - pos
    return p, before, errors_before, size


def _aurc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mean risk over k = 1..n, summed group by group in closed form (harmonic numbers)."""
    n = int(round((pos + neg)[0].sum()))
    if n == 0:
        return np.full(pos.shape[0], np.nan)
    harmonic = _harmonic(n)
    p, before, errors_before, size = _group_risk_terms(pos, neg)
    start, stop = before.astype(np.int64), (before + size).astype(np.int64)
    total = pos + (errors_before - p * before) * (harmonic[stop] - harmonic[start])  # (B, G)
    return total.sum(axis=1) / n


def _oracle_aurc(n_err: np.ndarray, n: int) -> np.ndarray:
    """AURC of the oracle that ranks every error above every correct item.

    Its risk is 0 up to ``k = n - e`` and ``(k - n + e) / k`` after, which sums
    to ``e - (n - e) (H[n] - H[n - e])``.
    """
    harmonic = _harmonic(n)
    n_err = n_err.astype(np.int64)
    return (n_err - (n - n_err) * (harmonic[n] - harmonic[n - n_err])) / n


def _prr_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Prediction-rejection ratio (AURC_random - AURC) / (AURC_random - AURC_oracle)."""
    n = int(round((pos + neg)[0].sum()))
    if n == 0:
        return np.full(pos.shape[0], np.nan)
    n_err = pos.sum(axis=1)
    random = n_err / n  # AURC of a random (or constant) score = the error rate
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (random - _aurc_from_counts(pos, neg)) / (random - _oracle_aurc(n_err, n))
    return np.where((n_err > 0) & (n_err < n), out, np.nan)


def _counts(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group counts of the items themselves, as a batch of one."""
    gid, n_groups = _group_ids(s)
    return _group_counts(gid, e, n_groups)


# --------------------------------------------------------------------------- metrics


def auroc(scores: ArrayLike, errors: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``errors``.

    Args:
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.

    Returns:
        AUROC in [0, 1] (0.5 = chance); NaN if only one class is present.
    """
    s, e = _as_arrays(scores, errors)
    if not _both_classes(e):
        return float("nan")
    preds = torch.from_numpy(_order_preserving_unit(s))
    return float(binary_auroc(preds, torch.from_numpy(e)))


def auprc(scores: ArrayLike, errors: ArrayLike) -> float:
    """Area under the precision-recall curve (average precision) for detecting errors.

    Args:
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.

    Returns:
        Average precision in [0, 1] (a random score gets the error rate); NaN if
        there is no error.
    """
    s, e = _as_arrays(scores, errors)
    if e.sum() == 0:
        return float("nan")
    preds = torch.from_numpy(_order_preserving_unit(s))
    return float(binary_average_precision(preds, torch.from_numpy(e)))


def aurc(scores: ArrayLike, errors: ArrayLike) -> float:
    """Area under the risk-coverage curve (lower is better).

    Items are sorted by score ascending (most confident first); the risk at
    coverage ``k/n`` is the error rate of the ``k`` most confident items, and
    AURC is the mean risk over ``k = 1..n``. Tied items enter together: within
    a tied group the risk is its expectation over the group's orderings.

    Args:
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.

    Returns:
        AURC in [0, 1]; equals the error rate for a constant score; NaN if empty.
    """
    s, e = _as_arrays(scores, errors)
    return float(_aurc_from_counts(*_counts(s, e))[0])


def prr(scores: ArrayLike, errors: ArrayLike) -> float:
    """Prediction-rejection ratio (Malinin et al.).

    ``PRR = (AURC_random - AURC_score) / (AURC_random - AURC_oracle)`` where
    ``AURC_random`` is the error rate and the oracle rejects every error before
    any correct item.

    Args:
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.

    Returns:
        1 for a perfect ranking, 0 for random, negative when worse than random;
        NaN when the error rate is 0 or 1.
    """
    s, e = _as_arrays(scores, errors)
    return float(_prr_from_counts(*_counts(s, e))[0])


def risk_coverage_curve(scores: ArrayLike, errors: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve, the points whose mean is :func:`aurc`.

    Args:
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.

    Returns:
        ``(coverage, risk)``: coverage ``k/n`` and the risk of the ``k`` most
        confident items, for ``k = 1..n`` (ties as in :func:`aurc`).
    """
    s, e = _as_arrays(scores, errors)
    n = s.size
    if n == 0:
        return np.empty(0), np.empty(0)
    gid, n_groups = _group_ids(s)
    p, before, errors_before, _ = (t[0] for t in _group_risk_terms(*_group_counts(gid, e, n_groups)))
    k = np.arange(1, n + 1)
    group_at_k = np.sort(gid)  # group of the k-th most confident item
    risk = p[group_at_k] + (errors_before[group_at_k] - p[group_at_k] * before[group_at_k]) / k
    return k / n, risk


def roc_curve(scores: ArrayLike, errors: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve over distinct thresholds, from (0, 0) to (1, 1).

    Args:
        scores: uncertainty scores, higher = more uncertain.
        errors: 1 = incorrect completion.

    Returns:
        ``(fpr, tpr)``; both empty if only one class is present.
    """
    s, e = _as_arrays(scores, errors)
    if not _both_classes(e):
        return np.empty(0), np.empty(0)
    pos, neg = (c[0, ::-1] for c in _counts(s, e))  # thresholds from high to low
    tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
    return fpr, tpr


METRICS: dict[str, Metric] = {"auroc": auroc, "auprc": auprc, "prr": prr, "aurc": aurc}

# The vectorised version of each public metric, used by the bootstrap.
_FROM_COUNTS: dict[Metric, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    auroc: _auroc_from_counts,
    auprc: _auprc_from_counts,
    aurc: _aurc_from_counts,
    prr: _prr_from_counts,
}


# --------------------------------------------------------------------------- bootstrap


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

    Returns:
        ``{"delta": float, "ci": [lo, hi], "p_value": float}``. The p-value is
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
    return {"delta": float(delta), "ci": [lo, hi], "p_value": p_value}


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
