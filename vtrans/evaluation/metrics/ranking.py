"""The metrics of the items' ranking by score: AUROC, AUPRC, AURC, PRR, and the ROC and risk-coverage curves.

The conventions of ``vtrans.evaluation.metrics`` hold: higher scores are more uncertain, 1 is an
error, NaN scores are refused (:func:`scored` drops them first), an undefined metric is NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from vtrans.evaluation.metrics.counts import (
    _aurc_from_counts,
    _counts,
    _group_counts,
    _group_ids,
    _group_risk_terms,
    _prr_from_counts,
)

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]
Metric = Callable[[ArrayLike, ArrayLike], float]


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
