"""``probe``: logistic regression on single-pass features, fitted on labelled items disjoint from the scored ones.

Which items, so that the latent's features are out-of-sample there as on the scored items, is
decided where the family is fitted (``vtrans.evaluation.evaluate.fit_items``, ``vtrans.evaluation.crossval``).

Features per item (:data:`FEATURES`): the lens trajectory (−log p_ℓ(ŷ) for every layer),
``entropy``, ``msp``, ``attention_entropy`` and, with a latent, ``posterior_var`` and
``latent_kl``: everything that one forward (plus the latent's encoders) gives. Features are
standardised with the training items' mean and deviation; the weights are fitted by L-BFGS with
an L2 penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtrans.estimators.base import Family, Fitted, Predict, Shown

FEATURES = ("lens_ce_by_layer", "entropy", "msp", "attention_entropy", "posterior_var", "latent_kl")


def features(scores: dict[str, torch.Tensor], keys: Sequence[str] = FEATURES) -> tuple[torch.Tensor, list[str]]:
    """(n, F) feature matrix and the feature names, from per-item scores and per-layer values.

    Args:
        scores: ``{key: (n,) or (n, k) tensor}``; a (n, k) one gives k columns ``{key}_L{i}``
            (``_by_layer`` dropped from the key).
        keys: the features, in order; those missing from ``scores`` are left out.
    """
    cols, names = [], []
    for key in keys:
        if key not in scores:
            continue
        value = scores[key].float()
        if value.dim() == 2:
            cols.append(value)
            names += [f"{key.removesuffix('_by_layer')}_L{i}" for i in range(value.shape[1])]
        else:
            cols.append(value.view(-1, 1))
            names.append(key)
    return torch.cat(cols, 1), names


@dataclass
class LogisticProbe:
    """A fitted probe: ``predict(x)`` is the probability that the completion is wrong."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    names: list[str]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) / self.std
        return torch.sigmoid(z @ self.weight + self.bias)


def fit(
    x: torch.Tensor, errors: torch.Tensor, names: list[str], l2: float = 1.0, steps: int = 200, standardise: bool = True
) -> LogisticProbe:
    """Fit on training items only. x: (n, F); errors: (n,) 0/1.

    Minimises the mean log-loss plus ``l2``·‖w‖²/n (the bias unpenalised): scikit-learn's
    ``LogisticRegression(C=1 / (2·l2))``. ``standardise``: on the training items' mean and
    deviation (else the raw features).

    Raises:
        ValueError: when the training items are all of one class (nothing to learn).
    """
    y = errors.float()
    if y.min() == y.max():
        raise ValueError("the probe's training items are all of one class: it cannot be fitted")
    x = torch.nan_to_num(x.float())
    if standardise:
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    z = (x - mean) / std
    weight = torch.zeros(z.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y)
        loss = loss + l2 * weight.pow(2).sum() / len(y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(mean, std, weight.detach(), bias.detach(), names)


def fit_on(scores: dict[str, torch.Tensor], errors: torch.Tensor, keys: Sequence[str] = FEATURES) -> Predict:
    """The family's ``fit``: the probe fitted on these items' :func:`features` (of ``keys``), as a
    ``predict`` of other items' probability of being wrong (from the same features)."""
    x, names = features(scores, keys)
    fitted = fit(x, errors, names)

    def predict(other: dict[str, torch.Tensor]) -> torch.Tensor:
        x_other, other_names = features(other, keys)
        if other_names != names:
            raise RuntimeError(f"probe features differ between fitted and scored items: {names} vs {other_names}")
        return fitted.predict(x_other)

    return predict


FAMILY = Family(
    "probe",
    {"probe": "logistic regression on the single-pass features, fitted on held-out labelled items"},
    None,
    reads_forward=False,
    fitted=Fitted("labelled items held out from the scored ones", fit_on, FEATURES),
    shown=Shown(default_score=False, prose={"cost": "the probe"}),
)
