"""Write the outputs of an evaluation: results.json, scores.jsonl, report.md and plots.

The file formats are the contracts of ``docs/design.md``. JSON is always
strict: NaN and infinities are written as ``null``; functions that read
results back (the table and the report) treat ``null`` as "not available".

Plots use :class:`matplotlib.figure.Figure` directly, not pyplot: no global
backend or figure registry is touched, and a figure is freed as soon as it is
saved and goes out of scope.

* ``results``: the files of the contract (results.json, scores.jsonl) and the statistics of
  :func:`build_results`: every estimator's metrics and its paired difference to the reference;
* ``tables``: the summary table, as plain text for a terminal and as markdown;
* ``plots``: the PNG plots (ROC, lens by layer, histograms, risk-coverage; the seed forest);
* ``prose``: report.md of a comparative run and of a cross-fitted one, and what they say in words.
"""

from vtrans.evaluation.report.plots import plot_all, plot_seed_forest
from vtrans.evaluation.report.prose import random_weights_sentence, write_crossval_md, write_report_md
from vtrans.evaluation.report.results import (
    build_results,
    item_row,
    p_wrong_record,
    with_p_wrong,
    write_results_json,
    write_scores_jsonl,
)
from vtrans.evaluation.report.tables import format_table

__all__ = [
    "build_results",
    "item_row",
    "p_wrong_record",
    "format_table",
    "plot_all",
    "plot_seed_forest",
    "random_weights_sentence",
    "write_crossval_md",
    "write_report_md",
    "write_results_json",
    "with_p_wrong",
    "write_scores_jsonl",
]
