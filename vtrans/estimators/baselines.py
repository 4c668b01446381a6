"""Single-pass baselines: ``msp`` = 1 − p(ŷ) and ``entropy`` of p(·|prompt), read off the shared forward's logits."""

from __future__ import annotations

import torch

from vtrans.backbone.tokens import Encoded, aggregate
from vtrans.config import EstimatorConfig
from vtrans.estimators.base import Context, Family, Forward, Shown, context_for, run_forward
from vtrans.estimators.common import entropy


def from_logits(logits: torch.Tensor, enc: Encoded, how: str = "first") -> dict[str, torch.Tensor]:
    """``msp`` and ``entropy`` (B,) from slot logits (B, N, V)."""
    logits = logits.float()
    return {"msp": aggregate(one_minus_p(logits, enc.targets), enc, how), "entropy": aggregate(entropy(logits), enc, how)}


def one_minus_p(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """1 − p(ids) as the mass of every other token, (...,) from logits (..., V) and ids (...).

    ``1 - softmax(logits)[ids]`` (or ``-expm1`` of ``log_softmax``) rounds to 0 in float32 once
    p is within ~1e-7 of 1, so confident items would tie; the other tokens' mass keeps its
    relative precision down to the smallest float and so ranks items exactly as −log p does.
    """
    logp = torch.log_softmax(logits.float(), -1)  # (..., V)
    others = logp.scatter(-1, ids.unsqueeze(-1), float("-inf"))  # ŷ's own mass left out
    return torch.logsumexp(others, -1).exp()


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    return from_logits(forward.logits, forward.enc, context.config.aggregate)


def scores(model, enc: Encoded, how: str = "first") -> dict[str, torch.Tensor]:
    """The family on one batch, with a forward of its own (tests and one-off use)."""
    n = enc.input_ids.shape[0]
    return read(run_forward(model, enc), context_for(model, EstimatorConfig(aggregate=how), n=n))


FAMILY = Family(
    "baselines",
    {"msp": "1 − p(ŷ), the model's own doubt about its answer", "entropy": "entropy of the next-token distribution"},
    read,
    shown=Shown(reference=True),
)
