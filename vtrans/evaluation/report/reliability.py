"""The report's reliability diagram: are an estimator's calibrated probabilities of error right?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from vtrans.evaluation.metrics import calibration
from vtrans.evaluation.report.results import _errors, _score_column, calibration_folds
from vtrans.evaluation.report.tables import _fmt


def plot_reliability(rows: Sequence[dict[str, Any]], results: dict[str, Any], names: list[str]) -> Figure | None:
    """Reliability of the cross-fitted Platt probabilities (``metrics.calibration``) of the
    reference and the three estimators with the highest AUROC: each bin's mean p(error) against
    its error rate, the marker's area its item count, ECE in the legend."""
    if not rows:
        return None
    errors, folds = _errors(rows), calibration_folds(rows)
    reference = results.get("reference")
    shown = list(dict.fromkeys([*([reference] if reference in names else []), *names[:3]]))
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="black", ls=":", lw=1.2, label="calibrated")
    for name in shown:
        column = _score_column(rows, name)
        keep = ~np.isnan(column)
        if len(set(errors[keep].tolist())) < 2:
            continue
        p = calibration.cross_fitted(column[keep], errors[keep], folds[keep])
        mean_p, rate, count = calibration.reliability(p, errors[keep])
        ece = calibration.ece(p, errors[keep])
        ax.plot(mean_p, rate, marker="o", lw=1.2, label=f"{name} (ECE {_fmt(ece)})")
        ax.scatter(mean_p, rate, s=8 + 120 * count / count.sum(), alpha=0.35)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted p(wrong), cross-fitted Platt scaling",
           ylabel="observed error rate in the bin", title=f"Reliability — {results.get('model', '')}")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    return fig
