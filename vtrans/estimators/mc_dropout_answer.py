"""MC dropout of the whole answer: T passes with dropout on, every answer token teacher-forced.

Under mask m the answer's probability is Π_t p_m(ŷ_t | prompt, ŷ_<t); the passes' predictive
integrates the mask out of the whole product, as ``latent_answer_nll`` integrates z:

* ``mc_dropout_answer_nll`` = −log (1/T) Σ_m Π_t p_m(ŷ_t | …): the dropout predictive's surprise at
  the whole answer;
* ``mc_dropout_answer_gap`` = (1/T) Σ_m −log Π_t p_m(ŷ_t | …) − ``mc_dropout_answer_nll`` ≥ 0
  (Jensen's gap): how much the masks alone move the answer's probability.

The dropout sites and their restoration are :func:`vtrans.estimators.mc_dropout.mc_dropout`'s;
the masks are drawn from a seed of the batch's first item, as the first token's family draws them.
"""

from __future__ import annotations

import math

import torch

from vtrans.backbone import architectures
from vtrans.backbone.tokens import Encoded, slot_positions
from vtrans.errors import ConfigError
from vtrans.estimators.base import Context, Family, Forward, Shown, device_rng, item_seed
from vtrans.estimators.latent_answer import answer_nll
from vtrans.estimators.mc_dropout import mc_dropout


@torch.no_grad()
def answer_nll_passes(
    model,
    enc: Encoded,
    passes: int,
    p: float,
    from_layer: int = 0,
    lower: torch.Tensor | None = None,
    max_logits: int = 1 << 27,
) -> torch.Tensor:
    """(B, passes): −Σ_t log p(ŷ_t | prompt, ŷ_<t) of each item's answer under each dropout mask.

    The batch is repeated ``passes`` times and run in chunks whose slot logits stay within
    ``max_logits`` (128 Mi: 512 MiB in float32); with ``from_layer`` k > 0 only blocks k..L-1 run
    T times, from ``lower`` (``hidden_states[k]`` of the shared forward).
    """
    n_layers = architectures.n_layers(model)
    if not 0 <= from_layer < n_layers:
        raise ConfigError(f"the MC dropout from_layer must be in 0..{n_layers - 1}, got {from_layer}")
    if from_layer > 0 and lower is None:
        raise ValueError("from_layer > 0 needs the stream after block k − 1 (the shared forward's hidden_states[k])")
    rep = enc.repeat(passes)
    slots = enc.targets.shape[1]
    chunk = max(1, max_logits // ((slots + 1) * architectures.unembedding(model).weight.shape[0]))
    out = []
    with mc_dropout(model, p, embeddings=from_layer == 0):
        for start in range(0, rep.input_ids.shape[0], chunk):
            sl = slice(start, start + chunk)
            common = dict(
                attention_mask=rep.attention_mask[sl], position_ids=rep.position_ids[sl], use_cache=False,
                logits_to_keep=slots + 1,
            )
            if from_layer == 0:
                logits = model(input_ids=rep.input_ids[sl], **common).logits
            else:
                rows = torch.arange(start, min(start + chunk, rep.input_ids.shape[0])) // passes
                with architectures.blocks_from(model, from_layer) as upper:
                    logits = upper(inputs_embeds=lower[rows.to(lower.device)], **common).logits
            part = rep.slice(start, start + logits.shape[0])
            out.append(answer_nll(slot_positions(logits, part), part))
    return torch.cat(out).view(enc.input_ids.shape[0], passes)


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    cfg, enc = context.config, forward.enc
    k = cfg.mc_from_layer
    lower = forward.hidden_states[k] if k > 0 and forward.hidden_states is not None else None
    with device_rng(enc.input_ids.device):
        torch.manual_seed(item_seed(cfg.seed, context.indices[0]))
        per_mask = answer_nll_passes(context.model, enc, cfg.passes, cfg.dropout, from_layer=k, lower=lower)
    nll = -(torch.logsumexp(-per_mask, 1) - math.log(cfg.passes))
    return {"mc_dropout_answer_nll": nll, "mc_dropout_answer_gap": (per_mask.mean(1) - nll).clamp(min=0)}


FAMILY = Family(
    "mc_dropout_answer",
    {
        "mc_dropout_answer_nll": "−log E_mask Π_t p(ŷ_t|…) over T dropout masks: the dropout predictive's surprise at the whole answer",
        "mc_dropout_answer_gap": "E_mask[−log p(answer)] − mc_dropout_answer_nll: how much the masks move the whole answer's probability",
    },
    read,
    needs=frozenset({"hidden_states", "whole_word"}),
    extra_passes=True,
    shown=Shown(default_score=False, prose={"cost": "MC dropout of the whole answer"}),
)
