"""Uncertainty estimators, one file per family; every score is oriented so that higher = more uncertain.

Each family is a ``vtrans.estimators.base.Family``: its names, what it needs, and a ``read`` of
the shared forward (``vtrans.estimators.runner``) on a batch whose targets are the base model's own
completion tokens (ŷ first). ``vtrans.estimators.registry`` lists them all.
"""
