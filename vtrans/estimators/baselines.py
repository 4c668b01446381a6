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
    p_y = torch.softmax(logits, -1).gather(-1, enc.targets.unsqueeze(-1)).squeeze(-1)  # (B, N)
    return {"msp": aggregate(1 - p_y, enc, how), "entropy": aggregate(entropy(logits), enc, how)}
