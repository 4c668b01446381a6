"""The metrics from counts: errors and correct items per group of tied scores, vectorised over resamples.

Every metric here depends on the scores only through their order and ties.
So each metric is computed from the counts of errors P and correct items N in
each group of equal scores, groups in ascending score order. A bootstrap
resample is just another set of counts: one ``np.bincount`` over the resample
matrix, with no sorting per resample. Each ``_*_from_counts`` takes (B, G)
matrices (one row per resample) and returns (B,) values, NaN where undefined.
"""

from __future__ import annotations

import numpy as np


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
