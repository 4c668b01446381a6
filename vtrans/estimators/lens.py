"""The logit lens through the residual stream (arXiv 2412.05768).

Every layer's state at the scored position is decoded with the final norm and the
unembedding (soft-capped where the model caps its logits, Gemma 2);
``lens_ce_by_layer[ℓ]`` = −log softmax(W_U·norm_f(h_ℓ))[ŷ], for ℓ = 0 (the embeddings, as
block 0 sees them: scaled and position-embedded where the family does so) .. L (the output).
Hugging Face's last hidden state is already normed, so the last layer is decoded without a
second norm and equals the model's own logits. ``lens_ce``
is the last layer (the output cross-entropy against the generated token, the paper's
measure) and ``lens_area`` the mean over layers (how slowly the stream converges).
"""

from __future__ import annotations

import torch

from vtrans.backbone import architectures
from vtrans.backbone.tokens import Encoded, aggregate, slot_positions
from vtrans.config import EstimatorConfig
from vtrans.estimators.base import Context, Family, Forward, Shown, context_for, run_forward
from vtrans.estimators.common import linear_at, log_partition


def trajectory(
    model,
    hidden_states: tuple[torch.Tensor, ...],
    enc: Encoded,
    ids: torch.Tensor,
    *more_ids: torch.Tensor,
    first_only: bool = False,
    max_logits: int = 1 << 26,
    final_logits: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """−log p_ℓ(ids) at every layer and slot, (B, L+1, N); (B, L+1, 1) at the first slot only with ``first_only``.

    Args:
        hidden_states: the L+1 states of a forward with ``output_hidden_states=True``.
        ids: (B, N) the token scored at each slot (ŷ, or the gold token for analysis).
        more_ids: further (B, N) id sets read off the same log-probabilities (each layer is
            unembedded once however many sets are asked for); then a tuple, one per set.
        first_only: decode only each item's first slot (the scored position): what
            ``aggregate="first"`` reads, at 1/N of the cost.
        max_logits: the most logits held at once (64 Mi floats: 256 MiB); they are far fewer anyway,
            a vocabulary block at a time (see :func:`~vtrans.estimators.common.log_partition`).
        final_logits: (B, N, V) the model's own logits at the slots, when the forward kept them:
            the last layer is read off them instead of being unembedded again.
    """
    unembed, norm = architectures.unembedding(model), architectures.final_norm(model)
    weight, bias, cap = unembed.weight, getattr(unembed, "bias", None), architectures.logit_softcap(model)
    sets = (ids, *more_ids)
    rows = torch.arange(ids.shape[0], device=ids.device)
    if first_only:
        sets = tuple(chosen[rows, enc.first_slot].unsqueeze(1) for chosen in sets)  # (B, 1) each
    states = []
    for h in hidden_states:
        h = slot_positions(h, enc)  # (B, N, C)
        states.append(h[rows, enc.first_slot].unsqueeze(1) if first_only else h)
    # every layer but the last goes through the final norm (the last is normed already); −log p_ℓ(chosen)
    # = log Z_ℓ − logit_ℓ(chosen), with log Z_ℓ summed over the vocabulary a block at a time and the
    # chosen logits read alone, so the (B, layers, N, V) logits never exist
    last = len(states) - 1
    decoded = states if final_logits is None else states[:-1]
    h = torch.stack([state if i == last else norm(state) for i, state in enumerate(decoded)], 1)  # (B, layers, N, C)
    log_z = log_partition(h.flatten(0, 2), weight, bias, max_logits, cap=cap).view(h.shape[:3])  # (B, layers, N)
    parts = [[log_z - linear_at(h, weight, bias, chosen.unsqueeze(1).expand(h.shape[:3]), cap)] for chosen in sets]
    if final_logits is not None:  # the last layer's logits exist already: read them
        final = (final_logits[rows, enc.first_slot].unsqueeze(1) if first_only else final_logits).float()  # (B, N, V)
        final_z = final.logsumexp(-1)  # (B, N)
        for acc, chosen in zip(parts, sets, strict=True):
            acc.append((final_z - final.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)).unsqueeze(1))  # (B, 1, N)
    out = tuple(torch.cat(acc, 1) for acc in parts)  # (B, L+1, N) each
    return out if more_ids else out[0]


def from_hidden_states(
    model,
    states: tuple[torch.Tensor, ...],
    enc: Encoded,
    how: str = "first",
    gold: torch.Tensor | None = None,
    final_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``lens_ce``, ``lens_area`` (B,) and ``lens_ce_by_layer`` (B, L+1) from a forward's hidden states;
    with ``gold`` (B,) first gold-token ids, also ``lens_ce_gold_by_layer`` (analysis only: it reads the answer)."""
    rows = torch.arange(enc.targets.shape[0], device=enc.targets.device)
    first = how == "first"
    if gold is None:
        traj = trajectory(model, states, enc, enc.targets, first_only=first, final_logits=final_logits)  # (B, L+1, N or 1)
    else:
        gold_ids = enc.targets.clone()
        gold_ids[rows, enc.first_slot] = gold.to(gold_ids.device)
        traj, gold_traj = trajectory(
            model, states, enc, enc.targets, gold_ids, first_only=first, final_logits=final_logits
        )
    if first:
        by_layer = traj[:, :, 0]
    else:
        by_layer = torch.stack([aggregate(traj[:, i], enc, how) for i in range(traj.shape[1])], 1)  # (B, L+1)
    result = {"lens_ce": by_layer[:, -1], "lens_area": by_layer.mean(1), "lens_ce_by_layer": by_layer}
    if gold is not None:
        result["lens_ce_gold_by_layer"] = gold_traj[:, :, 0] if first else gold_traj[rows, :, enc.first_slot]  # (B, L+1)
    return result


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    return from_hidden_states(
        context.model, forward.hidden_states, forward.enc, context.config.aggregate, forward.gold, forward.logits
    )


def scores(model, enc: Encoded, how: str = "first", gold: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The family on one batch, with a forward of its own (tests and one-off use)."""
    fwd = run_forward(model, enc, hidden_states=True, gold=gold)
    return read(fwd, context_for(model, EstimatorConfig(aggregate=how), n=enc.input_ids.shape[0]))


FAMILY = Family(
    "lens",
    {
        "lens_ce": "−log p(ŷ) decoded from the last layer (the paper's cross-entropy)",
        "lens_area": "mean over layers of the logit lens's −log p(ŷ): how slowly the stream settles",
    },
    read,
    needs=frozenset({"hidden_states"}),
    fields=("lens_ce_by_layer", "lens_ce_gold_by_layer"),
    shown=Shown(prose={"cost": "the lens"}),
)
