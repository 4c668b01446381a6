"""A score made a probability of error, and how good that probability is: ECE and the Brier score.

A score ranks items; a user acts on a probability. :func:`platt` fits p(error | s) =
σ(a·z + b) on the standardised score z by maximum likelihood (Newton's method on the two
parameters, a tiny ridge on ``a`` so that a score that separates the classes perfectly still
gives a finite fit). :func:`cross_fitted` fits it on all folds but one and applies it to that
one, so that no item's probability was fitted on its own label: the ECE and Brier score of a
results.json are of those probabilities. Conventions as in ``vtrans.evaluation.metrics``: higher
scores are more uncertain, 1 is an error, ``inf`` ranks last.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BINS = 10
RIDGE = 1e-3


def _finite(s: np.ndarray) -> np.ndarray:
    """±inf moved just past the finite extremes (their order kept), so that a fit can read them."""
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        return np.zeros_like(s)
    lo, hi = finite.min(), finite.max()
    span = max(hi - lo, 1.0)
    return np.clip(np.nan_to_num(s, posinf=hi + span, neginf=lo - span), lo - span, hi + span)


def platt(scores: np.ndarray, errors: np.ndarray, steps: int = 50) -> Callable[[np.ndarray], np.ndarray]:
    """Platt scaling fitted on these items: ``predict(scores) -> p(error)``.

    Raises:
        ValueError: the items are all of one class (no probability to fit but a constant).
    """
    s, y = _finite(np.asarray(scores, dtype=np.float64)), np.asarray(errors, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("Platt scaling needs both correct and wrong items")
    mean, sd = s.mean(), max(s.std(), 1e-12)
    z = (s - mean) / sd
    x = np.stack([z, np.ones_like(z)], 1)  # (n, 2)
    w = np.array([0.0, np.log(y.mean() / (1 - y.mean()))])
    penalty = np.diag([RIDGE * len(y), 0.0])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + penalty @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break

    def predict(other: np.ndarray) -> np.ndarray:
        o = np.asarray(other, dtype=np.float64)
        finite = np.isfinite(o)
        o = np.where(finite, o, np.where(o > 0, s.max(), s.min()))  # inf: as the most extreme fitted score
        return 1 / (1 + np.exp(-(((o - mean) / sd) * w[0] + w[1])))

    return predict


def cross_fitted(scores: np.ndarray, errors: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each item's Platt probability from the fit on the other folds; NaN in a fold whose
    outside is all of one class."""
    scores, errors, folds = np.asarray(scores, dtype=np.float64), np.asarray(errors), np.asarray(folds)
    out = np.full(scores.shape, np.nan)
    for fold in np.unique(folds):
        inside = folds == fold
        try:
            predict = platt(scores[~inside], errors[~inside])
        except ValueError:
            continue
        out[inside] = predict(scores[inside])
    return out


def ece(p: np.ndarray, errors: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the item-weighted mean |mean p − error rate| over equal-width
    bins of p (NaN probabilities left out; NaN with none left)."""
    p, e = np.asarray(p, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    keep = ~np.isnan(p)
    p, e = p[keep], e[keep]
    if p.size == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(p[inside].mean() - e[inside].mean())
    return float(total / p.size)


def brier(p: np.ndarray, errors: np.ndarray) -> float:
    """Mean squared difference of p(error) and the 0/1 error (NaN probabilities left out)."""
    p, e = np.asarray(p, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    keep = ~np.isnan(p)
    return float(np.mean((p[keep] - e[keep]) ** 2)) if keep.any() else float("nan")


def reliability(p: np.ndarray, errors: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin of p: the mean p, the error rate and the item count (for a reliability diagram)."""
    p, e = np.asarray(p, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    keep = ~np.isnan(p)
    p, e = p[keep], e[keep]
    which = np.minimum((p * bins).astype(int), bins - 1)
    found = [b for b in range(bins) if (which == b).any()]
    return (np.array([p[which == b].mean() for b in found]), np.array([e[which == b].mean() for b in found]),
            np.array([(which == b).sum() for b in found]))
