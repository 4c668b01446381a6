"""Uncertainty estimators, one file per family; every score is oriented so that higher = more uncertain.

Each family exposes ``scores(...) -> dict[name, Tensor (B,)]`` on an ``Encoded`` batch whose
targets are the base model's own completion tokens (ŷ first).
"""

from vtrans.estimators.registry import FAMILIES, NAMES, family_of

__all__ = ["FAMILIES", "NAMES", "family_of"]
