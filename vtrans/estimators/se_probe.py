"""``se_probe``: a semantic-entropy probe (arXiv 2406.15927): a ridge map from the residual state at
the scored position to the entropy of the sampled words, fitted with no correctness labels.

Its target is ``sample_word_entropy`` of the items it is fitted on (their sampled completions:
a cost of its fit only); it scores an item with the one forward that gives the state, no
sampling. The depth (``vtrans.estimators.states``), the ridge penalty (:data:`RIDGE`) and the
standardisation are chosen by mean squared error over inner folds of the items it is fitted on
(``vtrans.estimators.state_probe.INNER``); the labels are never read.
"""

from __future__ import annotations

import itertools
import math

import torch

from vtrans.estimators.base import Family, Fitted, Predict, Shown
from vtrans.estimators.state_probe import INNER

RIDGE = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def ridge(x: torch.Tensor, y: torch.Tensor, alpha: float, standardise: bool):
    """The ridge fit of ``y`` on ``x`` (bias unpenalised: scikit-learn's ``Ridge(alpha)`` on the
    same columns), in float64; returns ``predict(x)``."""
    x, y = x.double(), y.double()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6) if standardise else torch.ones_like(mean)
    z = (x - mean) / std
    y_mean = y.mean()
    n, c = z.shape
    if c <= n:
        w = torch.linalg.solve(z.T @ z + alpha * torch.eye(c, dtype=z.dtype), z.T @ (y - y_mean))
    else:  # the dual form: an n x n system
        w = z.T @ torch.linalg.solve(z @ z.T + alpha * torch.eye(n, dtype=z.dtype), y - y_mean)
    return lambda other: (((other.double() - mean) / std) @ w + y_mean).float()


def choose(states: torch.Tensor, target: torch.Tensor) -> dict:
    """``{"depth", "alpha", "standardise", "mse"}`` with the least mean inner-fold squared error."""
    rows = torch.arange(len(target)) % INNER
    best: dict = {"mse": math.inf}
    for depth, alpha, standardise in itertools.product(range(states.shape[1]), RIDGE, (True, False)):
        x, errors = states[:, depth], []
        for part in range(INNER):
            inside = rows == part
            if inside.all() or not inside.any():
                continue
            predict = ridge(x[~inside], target[~inside], alpha, standardise)
            errors.append(float((predict(x[inside]) - target[inside]).pow(2).mean()))
        mse = sum(errors) / len(errors) if errors else math.nan
        if mse < best["mse"]:
            best = {"depth": depth, "alpha": alpha, "standardise": standardise, "mse": mse}
    if best["mse"] == math.inf:
        best = {"depth": states.shape[1] - 1, "alpha": RIDGE[0], "standardise": True, "mse": math.nan}
    return best


def fit_on(features: dict[str, torch.Tensor], errors: torch.Tensor) -> Predict:
    """The family's ``fit``: ``errors`` are not read (no correctness labels).

    Raises:
        ValueError: the sampled words' entropy was not computed for the items it is fitted on.
    """
    del errors  # fitted without labels
    if "sample_word_entropy" not in features:
        raise ValueError("se_probe is fitted on the sampled words' entropy (sample_word_entropy), which was not computed")
    states, target = features["residual_states"].float(), features["sample_word_entropy"].float()
    keep = torch.isfinite(target)
    best = choose(states[keep], target[keep])
    predict = ridge(states[keep][:, best["depth"]], target[keep], best["alpha"], best["standardise"])
    return lambda other: predict(other["residual_states"][:, best["depth"]])


FAMILY = Family(
    "se_probe",
    {"se_probe": "ridge map from the residual state to the sampled words' entropy, fitted with no labels"},
    None,
    reads_forward=False,
    fitted=Fitted("prompts held out from the scored ones (no labels)", fit_on, ("residual_states",), ("sample_word_entropy",), labels=False),
    shown=Shown(default_score=False, prose={"cost": "the semantic-entropy probe"}),
)
