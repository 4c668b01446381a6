"""``probe``: logistic regression on single-pass features, fitted on items disjoint from the evaluated ones.

Which items, so that the latent's features are out-of-sample there as on the evaluated items,
is decided by ``vtrans.evaluate.probe_train_items``.

Features per item: the lens trajectory (−log p_ℓ(ŷ) for every layer), ``entropy``, ``msp``,
``attention_entropy`` and, with a latent, ``posterior_var`` and ``latent_kl``: everything that
one forward (plus the latent's encoders) gives. Features are standardised with the training
items' mean and deviation; the weights are fitted by L-BFGS with an L2 penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtrans.estimators.base import Family


def features(
    scores: dict[str, torch.Tensor], lens_by_layer: torch.Tensor, scalars: Sequence[str]
) -> tuple[torch.Tensor, list[str]]:
    """(n, F) feature matrix and the feature names, from per-item scores and the lens trajectory.

    Args:
        scalars: the scalar features, in order (the registry's ``PROBE_FEATURES``); those
            missing from ``scores`` are left out.
    """
    cols = [lens_by_layer.float()]
    names = [f"lens_ce_L{i}" for i in range(lens_by_layer.shape[1])]
    for name in scalars:
        if name in scores:
            cols.append(scores[name].float().view(-1, 1))
            names.append(name)
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


def fit(x: torch.Tensor, errors: torch.Tensor, names: list[str], l2: float = 1.0, steps: int = 200) -> LogisticProbe:
    """Fit on training items only. x: (n, F); errors: (n,) 0/1.

    Raises:
        ValueError: when the training items are all of one class (nothing to learn).
    """
    y = errors.float()
    if y.min() == y.max():
        raise ValueError("the probe's training items are all of one class: it cannot be fitted")
    x = torch.nan_to_num(x.float())
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
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


FAMILY = Family(
    "probe",
    {"probe": "logistic regression on the single-pass features, fitted on held-out labelled items"},
    None,
    needs=frozenset({"labels"}),
    reads_forward=False,
    default_score=False,
)
