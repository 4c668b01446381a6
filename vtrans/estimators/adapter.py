"""``adapter_nll``: the latent as a plain adapter, z at its mean.

−log p(ŷ | prompt, z = m(prompt)), with m the mean of z's inference distribution: the
conditional prior's mean, q(z|prompt)'s for the standard prior, and the deterministic twin's z
itself (``prior: deterministic``, the twin trained by maximum likelihood with no noise and no
KL). One pass of the scored position through the blocks above the latent, no sampling.

On a variational latent it is ``latent_nll`` with the spread of z taken out; on the twin it is
the only score there is. Their paired difference is what the variational training adds to
detection beyond an adapter of the same size, place, data and epochs.
"""

from __future__ import annotations

import torch

from vtrans.estimators.base import Context, Family, Forward
from vtrans.estimators.common import predictive_stats
from vtrans.estimators.latent import layer_state, sample_chunks


def logits_at_mean(module, forward: Forward) -> torch.Tensor:
    """(B, 1, V) next-token logits at the scored position under ``module``, z at its mean, from the
    shared forward's states and cache."""
    enc = forward.enc
    h = layer_state(forward, module)
    z = module.latent.mean(module.states(h, enc)[0]).unsqueeze(1)  # (B, 1, d_z)
    return torch.cat([logits for _, logits in sample_chunks(module, h, enc, forward.cache, z)])


def nll_at_mean(module, forward: Forward) -> torch.Tensor:
    """(B,) −log p(ŷ | prompt, z = the mean of z) under ``module``."""
    logits = logits_at_mean(module, forward)
    return predictive_stats(logits, forward.y.to(logits.device))["nll"]


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    return {"adapter_nll": nll_at_mean(context.module, forward)}


FAMILY = Family(
    "adapter",
    {"adapter_nll": "−log p(ŷ|prompt, z = its mean): the latent as an adapter (the twin's own score)"},
    read,
    needs=frozenset({"latent", "hidden_states", "cache"}),
    extra_passes=True,
    first_token_only=True,
)
