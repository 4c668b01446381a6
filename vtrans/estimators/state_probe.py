"""``state_probe``: L2 logistic regression on the residual stream at the scored position (SAPLMA,
arXiv 2304.13734), and ``state_probe_latent``, the same with the latent's ``adapter_nll`` added.

It reads ``residual_states`` (``vtrans.estimators.states``: four depths fixed in advance). Which
depth, the L2 penalty (:data:`L2`) and whether the state is standardised are chosen by the mean
AUROC over :data:`INNER` inner folds of the items it is fitted on (every ``INNER``-th row), never
on the items it scores; the chosen setting is then fitted on all of them. Fitted and cross-fitted
as ``probe`` is (``vtrans.evaluation.fitted``).
"""

from __future__ import annotations

import itertools
import math

import torch

from vtrans.estimators import probe
from vtrans.estimators.base import Family, Fitted, Predict, Shown

L2 = (1.0, 10.0, 100.0, 1000.0)
INNER = 4


def columns(features: dict[str, torch.Tensor], depth: int, extra: tuple[str, ...]) -> torch.Tensor:
    """(n, C + len(extra)): the state at one depth, then the ``extra`` per-item features."""
    x = features["residual_states"][:, depth].float()
    return torch.cat([x, *(features[key].float().view(-1, 1) for key in extra)], 1)


def auroc(scores: torch.Tensor, errors: torch.Tensor) -> float:
    """P(an error scores above a correct item), ties counted half: the Mann-Whitney AUROC
    (this module is imported by ``vtrans score``, which must not load the evaluation's metrics)."""
    wrong, right = scores[errors.bool()], scores[~errors.bool()]
    above = (wrong[:, None] > right[None]).double().mean()
    tied = (wrong[:, None] == right[None]).double().mean()
    return float(above + 0.5 * tied)


def inner_auroc(x: torch.Tensor, errors: torch.Tensor, l2: float, standardise: bool) -> float:
    """The mean AUROC of the fit over inner folds (rows i mod INNER); NaN where no fold has both classes."""
    rows = torch.arange(len(errors)) % INNER
    found = []
    for part in range(INNER):
        inside = rows == part
        train, test = errors[~inside], errors[inside]
        if train.min() == train.max() or test.min() == test.max():
            continue
        fitted = probe.fit(x[~inside], train, [], l2=l2, standardise=standardise)
        found.append(auroc(fitted.predict(x[inside]), test))
    return sum(found) / len(found) if found else math.nan


def choose(features: dict[str, torch.Tensor], errors: torch.Tensor, extra: tuple[str, ...] = ()) -> dict:
    """The setting with the best inner-fold AUROC: ``{"depth", "l2", "standardise", "auroc"}``
    (the first of the grid on a tie)."""
    best: dict = {"auroc": -math.inf}
    depths = range(features["residual_states"].shape[1])
    for depth, l2, standardise in itertools.product(depths, L2, (True, False)):
        got = inner_auroc(columns(features, depth, extra), errors, l2, standardise)
        if got > best["auroc"]:
            best = {"depth": depth, "l2": l2, "standardise": standardise, "auroc": got}
    if best["auroc"] == -math.inf:
        best = {"depth": len(depths) - 1, "l2": L2[0], "standardise": True, "auroc": math.nan}
    return best


def fit_with(features: dict[str, torch.Tensor], errors: torch.Tensor, extra: tuple[str, ...] = ()) -> Predict:
    """The probe at the chosen setting (:func:`choose`), fitted on all of these items.

    Raises:
        ValueError: the items are all of one class.
    """
    if errors.min() == errors.max():
        raise ValueError("the state probe's training items are all of one class: it cannot be fitted")
    best = choose(features, errors, extra)
    fitted = probe.fit(columns(features, best["depth"], extra), errors, [], l2=best["l2"], standardise=best["standardise"])
    return lambda other: fitted.predict(columns(other, best["depth"], extra))


def fit_on(features: dict[str, torch.Tensor], errors: torch.Tensor) -> Predict:
    return fit_with(features, errors)


def fit_with_latent(features: dict[str, torch.Tensor], errors: torch.Tensor) -> Predict:
    """``state_probe_latent``'s fit.

    Raises:
        ValueError: ``adapter_nll`` was not computed (no latent): this would be the state probe.
    """
    if "adapter_nll" not in features:
        raise ValueError("state_probe_latent reads the latent's adapter_nll, which was not computed (no latent)")
    return fit_with(features, errors, ("adapter_nll",))


FAMILY = Family(
    "state_probe",
    {"state_probe": "logistic regression on the residual state at the scored position, fitted on held-out labelled items"},
    None,
    reads_forward=False,
    fitted=Fitted("labelled items held out from the scored ones", fit_on, ("residual_states",)),
    shown=Shown(default_score=False, prose={"cost": "the state probe"}),
)
WITH_LATENT = Family(
    "state_probe_latent",
    {"state_probe_latent": "the state probe with the latent's prediction of ŷ (adapter_nll) added"},
    None,
    needs=frozenset({"latent"}),
    reads_forward=False,
    fitted=Fitted("labelled items held out from the scored ones", fit_with_latent, ("residual_states", "adapter_nll")),
    shown=Shown(default_score=False, prose={"cost": "the state probe with the latent's prediction"}),
)
