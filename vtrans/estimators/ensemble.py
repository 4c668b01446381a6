"""An ensemble of M independently seeded latents: the spread of their predictions.

Each member m is a latent trained from its own seed on the same items (``vtrans crossval
--ensemble M``); it predicts the scored position with z at its mean, p_m(·) = p(·|prompt,
z = m_m(prompt)) (see ``vtrans.estimators.adapter``), so what varies across members is the
weights alone, as in a deep ensemble (Lakshminarayanan et al., 2017):

* ``ensemble_nll``: −log (1/M) Σ_m p_m(ŷ), the ensemble predictive's surprise at ŷ (its mean);
* ``ensemble_var``: the variance over members of log p_m(ŷ): how much they disagree about ŷ;
* ``ensemble_mi``: the mutual information between the next token and the member,
  (1/M) Σ_m KL(p_m ‖ p̄), their disagreement over the whole vocabulary (the ensemble's
  epistemic part).
"""

from __future__ import annotations

import math

import torch

from vtrans.estimators.base import Context, Family, Forward
from vtrans.estimators.latent import layer_state, sample_chunks


def member_logits(members, forward: Forward) -> torch.Tensor:
    """(B, M, V) each member's next-token logits at the scored position, z at its mean."""
    enc, columns = forward.enc, []
    for module in members:
        h = layer_state(forward, module)
        z = module.latent.mean(module.states(h, enc)[0]).unsqueeze(1)  # (B, 1, d_z)
        columns.append(torch.cat([logits for _, logits in sample_chunks(module, h, enc, forward.cache, z)]))
    return torch.cat(columns, 1)


def ensemble_stats(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three scores from (B, M, V) member logits and (B,) ŷ, in float64 (see
    ``vtrans.estimators.common.predictive_stats`` for why the MI is a mean KL)."""
    members = logits.shape[1]
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, M, V)
    log_mean = torch.logsumexp(logp, dim=1) - math.log(members)  # (B, V)
    logp_y = logp.gather(-1, y.view(-1, 1, 1).expand(-1, members, 1)).squeeze(-1)  # (B, M)
    kl = (logp.exp() * (logp - log_mean.unsqueeze(1))).sum(-1)  # (B, M)
    return {
        "ensemble_nll": (-log_mean.gather(-1, y.view(-1, 1)).squeeze(-1)).float(),
        "ensemble_var": logp_y.var(1, unbiased=False).float(),
        "ensemble_mi": kl.mean(1).clamp_min(0.0).float(),
    }


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    logits = member_logits(context.members, forward)
    y = forward.y.to(logits.device)
    step = max(1, (1 << 20) // (logits.shape[1] * logits.shape[2]))  # a few items at a time: the passes read from cache
    parts = [ensemble_stats(logits[a : a + step], y[a : a + step]) for a in range(0, logits.shape[0], step)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


FAMILY = Family(
    "ensemble",
    {
        "ensemble_nll": "−log of the ensemble's mean p(ŷ), each member's z at its mean",
        "ensemble_var": "variance over the ensemble's members of log p(ŷ)",
        "ensemble_mi": "mutual information between the next token and the member (mean KL from the ensemble's predictive)",
    },
    read,
    needs=frozenset({"latent", "ensemble", "hidden_states", "cache"}),
    extra_passes=True,
    first_token_only=True,
    default_score=False,
)
