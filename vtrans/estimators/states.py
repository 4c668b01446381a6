"""The residual stream at the scored position, at depths fixed in advance: what the state probes read.

``residual_states`` is (B, len(DEPTHS), C): the state after block round(d·L) for each d of
:data:`DEPTHS` (L/4, L/2, 3L/4 and the output, Hugging Face's last state, already normed), at
the position whose logits predict ŷ. It is a feature (``Family.features``): kept only when a
fitted family asks for it, never written into scores.jsonl.
"""

from __future__ import annotations

import torch

from vtrans.backbone.tokens import slot_positions
from vtrans.estimators.base import Context, Family, Forward

DEPTHS = (0.25, 0.5, 0.75, 1.0)


def layers(n_layers: int) -> list[int]:
    """The hidden-state indices read for a model of ``n_layers`` blocks (0 is the embeddings)."""
    return [max(1, round(d * n_layers)) for d in DEPTHS]


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    states = forward.hidden_states
    picked = [forward.first_slot(slot_positions(states[i], forward.enc)) for i in layers(len(states) - 1)]
    return {"residual_states": torch.stack(picked, 1)}  # (B, depths, C)


FAMILY = Family(
    "states",
    {},
    read,
    needs=frozenset({"hidden_states"}),
    features=("residual_states",),
)
