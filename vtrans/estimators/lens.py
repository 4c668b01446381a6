"""The logit lens through the residual stream (arXiv 2412.05768).

Every layer's state at the scored position is decoded with the final norm and the
unembedding; ``lens_ce_by_layer[ℓ]`` = −log softmax(W_U·norm_f(h_ℓ))[ŷ], for ℓ = 0 (the
embeddings) .. L (the output). Hugging Face's last hidden state is already normed, so the
last layer is decoded without a second norm and equals the model's own logits. ``lens_ce``
is the last layer (the output cross-entropy against the generated token, the paper's
measure) and ``lens_area`` the mean over layers (how slowly the stream converges).
"""

from __future__ import annotations

import torch

from vtrans import backbones
from vtrans.tokens import Encoded, aggregate, slot_positions


def trajectory(model, hidden_states: tuple[torch.Tensor, ...], enc: Encoded, ids: torch.Tensor) -> torch.Tensor:
    """−log p_ℓ(ids) at every layer and slot, (B, L+1, N).

    Args:
        hidden_states: the L+1 states of a forward with ``output_hidden_states=True``.
        ids: (B, N) the token scored at each slot (ŷ, or the gold token for analysis).
    """
    unembed, norm = backbones.unembedding(model), backbones.final_norm(model)
    last = len(hidden_states) - 1
    out = []
    for layer, h in enumerate(hidden_states):
        h = slot_positions(h, enc)  # (B, N, C)
        logits = unembed(h if layer == last else norm(h)).float()  # (B, N, V)
        out.append(-torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1))  # (B, N)
    return torch.stack(out, 1)


def hidden_states(model, enc: Encoded) -> tuple[torch.Tensor, ...]:
    out = model(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        position_ids=enc.position_ids,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    return out.hidden_states


@torch.no_grad()
def scores(model, enc: Encoded, how: str = "first", gold: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``lens_ce``, ``lens_area`` (B,) and ``lens_ce_by_layer`` (B, L+1); with ``gold`` (B,) first
    gold-token ids, also ``lens_ce_gold_by_layer`` (analysis only: it reads the answer)."""
    states = hidden_states(model, enc)
    traj = trajectory(model, states, enc, enc.targets)  # (B, L+1, N)
    by_layer = torch.stack([aggregate(traj[:, i], enc, how) for i in range(traj.shape[1])], 1)  # (B, L+1)
    result = {"lens_ce": by_layer[:, -1], "lens_area": by_layer.mean(1), "lens_ce_by_layer": by_layer}
    if gold is not None:
        rows = torch.arange(enc.targets.shape[0], device=gold.device)
        gold_ids = enc.targets.clone()
        gold_ids[rows, enc.first_slot] = gold
        result["lens_ce_gold_by_layer"] = trajectory(model, states, enc, gold_ids)[rows, :, enc.first_slot]
    return result
