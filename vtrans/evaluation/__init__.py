"""Comparing the estimators: runs over labelled items, cross-fitting, metrics and reports.

* ``evaluate``: the comparative run (``vtrans evaluate``);
* ``crossval``, ``folds``, ``units``: the cross-fitted run (``vtrans crossval``), its folds and
  latents, and its finished units on disk;
* ``metrics``: selective-prediction metrics and their bootstrap intervals;
* ``report``: results.json, scores.jsonl, report.md, the tables and the plots.
"""
