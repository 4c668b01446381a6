"""``attention_entropy``: mean entropy of the attention rows at the scored position.

Attention weights are mixing coefficients, not probabilities of anything the model is unsure
about; the estimator is in the harness so that the popular reading can be tested.
"""

from __future__ import annotations

import torch

from vtrans.estimators.common import entropy_of_probs
from vtrans.tokens import Encoded


@torch.no_grad()
def scores(model, enc: Encoded) -> dict[str, torch.Tensor]:
    """Needs a model loaded with ``attn_implementation="eager"`` (SDPA returns no weights)."""
    out = model(
        **enc.inputs,
        output_attentions=True,
        use_cache=False,
        logits_to_keep=1,
    )
    return from_attentions(out.attentions, enc)


def from_attentions(attentions: tuple[torch.Tensor, ...] | None, enc: Encoded) -> dict[str, torch.Tensor]:
    """:func:`scores` from the attention weights (each (B, H, T, T)) of a forward already run."""
    if not attentions or attentions[0] is None:
        raise RuntimeError("the model returned no attention weights: load it with attn_implementation='eager'")
    rows = torch.arange(enc.input_ids.shape[0], device=enc.input_ids.device)
    per_layer = [entropy_of_probs(a[rows, :, enc.scored].float()).mean(-1) for a in attentions]  # (B,) each
    return {"attention_entropy": torch.stack(per_layer, 1).mean(1)}
