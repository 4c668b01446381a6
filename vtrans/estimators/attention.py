"""``attention_entropy``: mean entropy of the attention rows at the scored position.

Attention weights are mixing coefficients, not probabilities of anything the model is unsure
about; the estimator is in the comparison so that the popular reading can be tested.
"""

from __future__ import annotations

import torch

from vtrans.backbone.tokens import Encoded
from vtrans.estimators.base import Context, Family, Forward, context_for, run_forward
from vtrans.estimators.common import entropy_of_probs


def from_attentions(attentions: tuple[torch.Tensor, ...] | None, enc: Encoded) -> dict[str, torch.Tensor]:
    """``attention_entropy`` (B,) from the attention weights (each (B, H, T, T)) of a forward."""
    if not attentions or attentions[0] is None:
        raise RuntimeError("the model returned no attention weights: load it with attn_implementation='eager'")
    rows = torch.arange(enc.input_ids.shape[0], device=enc.input_ids.device)
    per_layer = [entropy_of_probs(a[rows, :, enc.scored].float()).mean(-1) for a in attentions]  # (B,) each
    return {"attention_entropy": torch.stack(per_layer, 1).mean(1)}


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    return from_attentions(forward.attentions, forward.enc)


def scores(model, enc: Encoded) -> dict[str, torch.Tensor]:
    """The family on one batch with a forward of its own; the model must use eager attention."""
    return read(run_forward(model, enc, attentions=True), context_for(model, n=enc.input_ids.shape[0]))


FAMILY = Family(
    "attention",
    {"attention_entropy": "mean entropy of the attention rows at the scored position"},
    read,
    needs=frozenset({"attentions"}),
    first_token_only=True,
)
