"""A score made a probability of error, and how good that probability is: ECE and the Brier score.

A score ranks items; a user acts on a probability. :func:`platt` fits p(error | s) =
σ(a·z + b) on the standardised score z, as ``vtrans.latent.calibration`` fits the map a latent
carries. :func:`cross_fitted` fits it on all folds but one and applies it to that
one, so that no item's probability was fitted on its own label: the ECE and Brier score of a
results.json are of those probabilities. Conventions as in ``vtrans.evaluation.metrics``: higher
scores are more uncertain, 1 is an error, ``inf`` ranks last.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vtrans.latent.calibration import fit_platt
from vtrans.latent.calibration import predict as apply_map

BINS = 10


def platt(scores: np.ndarray, errors: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Platt scaling fitted on these items (``vtrans.latent.calibration.fit_platt``): ``predict(scores) -> p(error)``.

    Raises:
        ValueError: the items are all of one class (no probability to fit but a constant).
    """
    params = fit_platt(scores, errors)
    return lambda other: apply_map("platt", params, other)


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
