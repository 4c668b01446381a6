"""MC dropout: T stochastic passes with dropout on; variance of p(ŷ), entropy of the mean, BALD MI.

A family with dropout of its own (GPT-2: embeddings, attention probabilities, residual
branches; GPT-NeoX: embeddings and residual branches; Phi-3: residual branches; the sites are
``vtrans.backbones``' table) has its modules switched to training mode and given probability p.
A family with none (Llama, Mistral, Qwen, Gemma) has dropout inserted on every block's residual
branches (what each adds to the stream) with forward hooks. Both are context managers that
restore the model in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from vtrans.backbone import architectures as backbones
from vtrans.backbone.tokens import Encoded
from vtrans.config import EstimatorConfig
from vtrans.errors import ConfigError
from vtrans.estimators.base import (
    Context,
    Family,
    Forward,
    Shown,
    context_for,
    device_rng,
    item_seed,
    run_forward,
)
from vtrans.estimators.common import predictive_stats


@contextlib.contextmanager
def mc_dropout(model, p: float, attention_p: float | None = None, embeddings: bool = True) -> Iterator[None]:
    """Dropout on at inference.

    Args:
        p: dropout probability (embeddings and residual branches).
        attention_p: attention-probability dropout (only a family that has it: GPT-2); defaults to ``p``.
        embeddings: also drop the embedding output where the family has an embedding dropout (off
            when the stream fed in is a deterministic layer-k state rather than embeddings).
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    attention_p = p if attention_p is None else attention_p
    sites = backbones.native_dropout(model)
    if sites:
        if not embeddings:
            sites = [m for m in sites if m is not backbones.embedding_dropout(model)]
        on_attention = {id(m) for m in backbones.attention_dropout(model)}
        saved = [(m, m.training, getattr(m, "p", None)) for m in sites]
        try:
            for module in sites:
                module.train(True)
                if isinstance(module, torch.nn.Dropout):
                    module.p = attention_p if id(module) in on_attention else p
            yield
        finally:
            for module, training, prob in saved:
                module.train(training)
                if prob is not None:
                    module.p = prob
        return

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    handles = [m.register_forward_hook(hook) for m in backbones.residual_branches(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def sample_logits(
    model,
    enc: Encoded,
    passes: int,
    p: float,
    chunk: int = 256,
    attention_p: float | None = None,
    from_layer: int = 0,
    lower: torch.Tensor | None = None,
    max_logits: int = 1 << 27,
) -> torch.Tensor:
    """Next-token logits at the scored position for ``passes`` dropout masks, (B, passes, V).

    The batch is repeated ``passes`` times and run in chunks of at most ``chunk`` rows, so the
    T passes cost T forwards of batched work. The unembedding runs at the scored positions'
    columns only, and a chunk holds at most ``max_logits`` logits (128 Mi: 512 MiB in float32;
    fewer rows a chunk where the vocabulary is large, Gemma's 262,144), so memory stays bounded
    whatever the vocabulary. With ``from_layer`` k > 0
    the blocks below k stay deterministic: only blocks k..L-1 run T times, from ``lower`` (the
    stream after block k − 1, ``hidden_states[k]`` of the shared forward; computed here when not given).
    """
    n_layers = backbones.n_layers(model)
    if not 0 <= from_layer < n_layers:
        raise ConfigError(f"the MC dropout from_layer must be in 0..{n_layers - 1}, got {from_layer}")
    if from_layer > 0 and lower is None:
        with backbones.blocks_until(model, from_layer) as body:
            lower = body(**enc.inputs, use_cache=False).last_hidden_state  # (B, T, C)
    rep = enc.repeat(passes)
    # the columns that predict a first target token (slot s of the last N + 1 columns) and each row's among them
    columns, slot = torch.unique(rep.input_ids.shape[1] - rep.targets.shape[1] - 1 + rep.first_slot, return_inverse=True)
    chunk = max(1, min(chunk, max_logits // (len(columns) * backbones.unembedding(model).weight.shape[0])))
    out = []
    with mc_dropout(model, p, attention_p, embeddings=from_layer == 0):
        for start in range(0, rep.input_ids.shape[0], chunk):
            sl = slice(start, start + chunk)
            common = dict(
                attention_mask=rep.attention_mask[sl],
                position_ids=rep.position_ids[sl],
                use_cache=False,
                logits_to_keep=columns.to(rep.input_ids.device),
            )
            if from_layer == 0:
                logits = model(input_ids=rep.input_ids[sl], **common).logits
            else:
                rows_lower = torch.arange(start, min(start + chunk, rep.input_ids.shape[0])) // passes
                with backbones.blocks_from(model, from_layer) as upper:
                    logits = upper(inputs_embeds=lower[rows_lower.to(lower.device)], **common).logits
            rows = torch.arange(logits.shape[0], device=logits.device)
            out.append(logits[rows, slot[sl].to(logits.device)].float())  # slot s is predicted at index s: (chunk, V)
    return torch.cat(out).view(enc.input_ids.shape[0], passes, -1)


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    """T passes with dropout on; the masks are drawn from a seed of the batch's first item (the global state is kept)."""
    cfg, enc = context.config, forward.enc
    k = cfg.mc_from_layer
    lower = forward.hidden_states[k] if k > 0 and forward.hidden_states is not None else None
    with device_rng(enc.input_ids.device):
        torch.manual_seed(item_seed(cfg.seed, context.indices[0]))
        logits = sample_logits(context.model, enc, cfg.passes, cfg.dropout, from_layer=k, lower=lower)
    stats = predictive_stats(logits, forward.y)
    return {"mc_dropout_var": stats["var"], "mc_dropout_entropy": stats["entropy"], "mc_dropout_mi": stats["mi"]}


def scores(
    model, enc: Encoded, passes: int = 16, p: float = 0.1, from_layer: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The family on one batch, with a forward of its own (tests and one-off use)."""
    config = EstimatorConfig(passes=passes, dropout=p, mc_from_layer=from_layer, seed=seed)
    fwd = run_forward(model, enc, hidden_states=from_layer > 0)
    return read(fwd, context_for(model, config, n=enc.input_ids.shape[0]))


FAMILY = Family(
    "mc_dropout",
    {
        "mc_dropout_var": "variance of p(ŷ) over T dropout masks",
        "mc_dropout_entropy": "entropy of the mean prediction over T dropout masks",
        "mc_dropout_mi": "mutual information between the next token and the dropout mask (BALD)",
    },
    read,
    needs=frozenset({"hidden_states"}),
    extra_passes=True,
    first_token_only=True,
    shown=Shown(default_score=False, prose={"cost": "MC dropout"}),
)
