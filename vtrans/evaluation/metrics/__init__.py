"""Selective-prediction metrics for "is this completion wrong?": the one place each is computed.

* ``ranking``: the metrics of the items' ranking (AUROC, AUPRC, AURC, PRR) and their curves;
* ``counts``: the same metrics from the counts of errors and correct items per group of tied
  scores, vectorised over the rows of a resample matrix;
* ``bootstrap``: percentile bootstrap intervals, the paired bootstrap of a difference, the spread
  over seeds, and every metric of one estimator at once (:func:`summarize`).

Conventions shared by every function here:

- ``scores``: a 1-D float array, **higher = more uncertain**. NaN is rejected
  (drop those items first); ``inf`` is allowed and simply ranks last.
- ``errors``: a 1-D 0/1 (int or bool) array of the same length, **1 = incorrect
  completion**.
- Inputs may be numpy arrays, torch tensors or sequences; they are converted
  once (``ranking._as_arrays``).
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

from vtrans.evaluation.metrics.bootstrap import (
    bootstrap_ci,
    paired_bootstrap,
    resampled_values,
    spread,
    summarize,
)
from vtrans.evaluation.metrics.ranking import (
    METRICS,
    auprc,
    aurc,
    auroc,
    prr,
    risk_coverage_curve,
    roc_curve,
    scored,
)

__all__ = [
    "METRICS",
    "auprc",
    "auroc",
    "aurc",
    "bootstrap_ci",
    "paired_bootstrap",
    "resampled_values",
    "prr",
    "risk_coverage_curve",
    "roc_curve",
    "scored",
    "spread",
    "summarize",
]
