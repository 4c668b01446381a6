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


def trajectory(
    model, hidden_states: tuple[torch.Tensor, ...], enc: Encoded, ids: torch.Tensor, *more_ids: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """−log p_ℓ(ids) at every layer and slot, (B, L+1, N).

    Args:
        hidden_states: the L+1 states of a forward with ``output_hidden_states=True``.
        ids: (B, N) the token scored at each slot (ŷ, or the gold token for analysis).
        more_ids: further (B, N) id sets read off the same log-probabilities (each layer is
            unembedded once however many sets are asked for); then a tuple, one per set.
    """
    unembed, norm = backbones.unembedding(model), backbones.final_norm(model)
    last = len(hidden_states) - 1
    sets = (ids, *more_ids)
    out: list[list[torch.Tensor]] = [[] for _ in sets]
    for layer, h in enumerate(hidden_states):
        h = slot_positions(h, enc)  # (B, N, C)
        logp = torch.log_softmax(unembed(h if layer == last else norm(h)).float(), -1)  # (B, N, V)
        for acc, chosen in zip(out, sets, strict=True):
            acc.append(-logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1))  # (B, N)
    stacked = tuple(torch.stack(acc, 1) for acc in out)
    return stacked if more_ids else stacked[0]


def hidden_states(model, enc: Encoded) -> tuple[torch.Tensor, ...]:
    out = model(
        **enc.inputs,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    return out.hidden_states


@torch.no_grad()
def scores(model, enc: Encoded, how: str = "first", gold: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``lens_ce``, ``lens_area`` (B,) and ``lens_ce_by_layer`` (B, L+1); with ``gold`` (B,) first
    gold-token ids, also ``lens_ce_gold_by_layer`` (analysis only: it reads the answer)."""
    return from_hidden_states(model, hidden_states(model, enc), enc, how, gold)


def from_hidden_states(
    model, states: tuple[torch.Tensor, ...], enc: Encoded, how: str = "first", gold: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """:func:`scores` from the hidden states of a forward already run (``output_hidden_states=True``)."""
    rows = torch.arange(enc.targets.shape[0], device=enc.targets.device)
    if gold is None:
        traj = trajectory(model, states, enc, enc.targets)  # (B, L+1, N)
    else:
        gold_ids = enc.targets.clone()
        gold_ids[rows, enc.first_slot] = gold.to(gold_ids.device)
        traj, gold_traj = trajectory(model, states, enc, enc.targets, gold_ids)
    by_layer = torch.stack([aggregate(traj[:, i], enc, how) for i in range(traj.shape[1])], 1)  # (B, L+1)
    result = {"lens_ce": by_layer[:, -1], "lens_area": by_layer.mean(1), "lens_ce_by_layer": by_layer}
    if gold is not None:
        result["lens_ce_gold_by_layer"] = gold_traj[rows, :, enc.first_slot]  # (B, L+1)
    return result
