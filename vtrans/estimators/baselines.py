"""Single-pass baselines: ``msp`` = 1 − p(ŷ) and ``entropy`` of p(·|prompt)."""

from __future__ import annotations

import torch

from vtrans.estimators.common import entropy
from vtrans.tokens import Encoded, aggregate, slot_positions


def forward_logits(model, enc: Encoded) -> torch.Tensor:
    """Logits at the positions that predict the completion's tokens, (B, N, V)."""
    n = enc.targets.shape[1]
    out = model(
        **enc.inputs,
        use_cache=False,
        logits_to_keep=n + 1,
    )
    return slot_positions(out.logits, enc)


@torch.no_grad()
def scores(model, enc: Encoded, how: str = "first") -> dict[str, torch.Tensor]:
    return from_logits(forward_logits(model, enc), enc, how)


def from_logits(logits: torch.Tensor, enc: Encoded, how: str = "first") -> dict[str, torch.Tensor]:
    """:func:`scores` from slot logits (B, N, V) already computed."""
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
