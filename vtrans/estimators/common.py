"""Small tensor helpers shared by the estimator families."""

from __future__ import annotations

import math

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_of_probs(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of a probability vector over the last axis (0·log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def predictive_stats(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spread of predictions over samples.

    Args:
        logits: (B, S, V) one next-token distribution per sample.
        y: (B,) the generated token ŷ.

    Returns:
        var: variance over samples of p(ŷ); entropy: H(mean p); mi: H(mean p) − mean H(p) (BALD);
        nll: −log mean p(ŷ), the surprise of the averaged predictive at ŷ (taken in log space).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, S, V)
    probs = logp.exp()
    logp_y = logp.gather(-1, y.view(-1, 1, 1).expand(-1, logp.shape[1], 1)).squeeze(-1)  # (B, S)
    h_mean = entropy_of_probs(probs.mean(1))
    mean_h = -(probs * logp).sum(-1).mean(1)
    return {
        "var": logp_y.exp().var(1, unbiased=False),
        "entropy": h_mean,
        "mi": (h_mean - mean_h).clamp_min(0.0),
        "nll": math.log(logp.shape[1]) - torch.logsumexp(logp_y, dim=1),
    }
