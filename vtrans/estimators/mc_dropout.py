"""MC dropout: T stochastic passes with dropout on; variance of p(ŷ), entropy of the mean, BALD MI.

GPT-2 has dropout of its own (embeddings, attention probabilities, residual branches): its
modules are switched to training mode and given probability p. Llama-family models have none,
so dropout is inserted on every block's residual branches (attention and MLP outputs) with
forward hooks. Both are context managers that restore the model in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from vtrans import backbones
from vtrans.estimators.common import predictive_stats
from vtrans.tokens import Encoded


@contextlib.contextmanager
def mc_dropout(model, p: float, attention_p: float | None = None) -> Iterator[None]:
    """Dropout on at inference.

    Args:
        p: dropout probability (embeddings and residual branches).
        attention_p: attention-probability dropout (GPT-2 only); defaults to ``p``.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    attention_p = p if attention_p is None else attention_p
    if backbones.family(model) == "gpt2":
        sites = backbones.native_dropout(model)
        saved = [(m, m.training, getattr(m, "p", None)) for m in sites]
        try:
            for module in sites:
                module.train(True)
                if isinstance(module, torch.nn.Dropout):
                    is_attention = module in {b.attn.attn_dropout for b in backbones.blocks(model)}
                    module.p = attention_p if is_attention else p
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
def sample_logits(model, enc: Encoded, passes: int, p: float, chunk: int = 256, attention_p: float | None = None):
    """Next-token logits at the scored position for ``passes`` dropout masks, (B, T_passes, V).

    The batch is repeated ``passes`` times and run in chunks of at most ``chunk`` rows, so the
    T passes cost T forwards of batched work and memory stays bounded.
    """
    rep = enc.repeat(passes)
    out = []
    with mc_dropout(model, p, attention_p):
        for start in range(0, rep.input_ids.shape[0], chunk):
            sl = slice(start, start + chunk)
            logits = model(
                input_ids=rep.input_ids[sl],
                attention_mask=rep.attention_mask[sl],
                position_ids=rep.position_ids[sl],
                use_cache=False,
                logits_to_keep=enc.targets.shape[1] + 1,
            ).logits
            rows = torch.arange(logits.shape[0], device=logits.device)
            out.append(logits[rows, rep.first_slot[sl]].float())  # slot s is predicted at index s: (chunk, V)
    return torch.cat(out).view(enc.input_ids.shape[0], passes, -1)


@torch.no_grad()
def scores(model, enc: Encoded, passes: int = 16, p: float = 0.1, chunk: int = 256) -> dict[str, torch.Tensor]:
    rows = torch.arange(enc.targets.shape[0], device=enc.targets.device)
    y = enc.targets[rows, enc.first_slot]  # (B,) ŷ
    stats = predictive_stats(sample_logits(model, enc, passes, p, chunk), y)
    return {"mc_dropout_var": stats["var"], "mc_dropout_entropy": stats["entropy"], "mc_dropout_mi": stats["mi"]}
