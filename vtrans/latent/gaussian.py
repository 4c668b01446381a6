"""The Gaussian latent layer: encoders for q(z|x) and p(z|prompt), and the injection into the stream.

Pure torch; knows nothing of Pyro, Lightning or a particular architecture. It reads
residual-stream states of width ``d_model`` and writes ``proj(z)`` back into the stream.
``proj`` starts at zero, so an untrained latent leaves the model's logits exactly as they were.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Prior = Literal["standard", "conditional", "deterministic"]
PRIORS = ("standard", "conditional", "deterministic")


class GaussianHead(nn.Module):
    """A small MLP from stream states to the location and scale of a diagonal Gaussian."""

    def __init__(self, d_in: int, d_z: int, hidden: int, min_scale: float = 1e-3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, 2 * d_z))
        self.min_scale = min_scale
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias[:d_z], 0.0)  # loc 0
        # softplus(b) + min_scale = 1 exactly: an untrained head is N(0, I), its KL to N(0, I) is 0
        nn.init.constant_(self.net[-1].bias[d_z:], math.log(math.expm1(1.0 - min_scale)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(self.norm(x.float())).chunk(2, dim=-1)  # (B, d_z) each
        return loc, F.softplus(raw) + self.min_scale


class GaussianLatent(nn.Module):
    """z in R^d_z with an amortised posterior and a standard or learned conditional prior.

    ``prior="standard"``: q(z|prompt) from the layer-k state at the scored position, p(z) = N(0, I).
    ``prior="conditional"``: q(z|prompt, target) from the scored state and the state of the last
    target token (which has attended to the whole target); p(z|prompt) from the scored state.
    ``prior="deterministic"``: the variational latent's deterministic twin: the conditional
    prior's network alone, z its mean (no noise, no posterior network, no KL), trained by
    maximum likelihood; an adapter of the same size at the same place.
    """

    def __init__(self, d_model: int, d_z: int = 16, prior: Prior = "conditional", hidden: int = 256) -> None:
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        self.d_z, self.prior = d_z, prior
        n_in = 2 if prior == "conditional" else 1
        self.posterior_head = GaussianHead(n_in * d_model, d_z, hidden) if prior != "deterministic" else None
        self.prior_head = GaussianHead(d_model, d_z, hidden) if prior != "standard" else None
        if prior == "deterministic":
            # z = the head's loc, with no noise: a zero loc layer and the zero projection would be a
            # saddle that no gradient leaves (each one's gradient is proportional to the other), so
            # the loc rows start as nn.Linear's do and the projection alone starts at zero (the
            # untrained twin still leaves the logits as they were)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.prior_head.net[-1].weight[:d_z], a=math.sqrt(5))
        self.proj = nn.Linear(d_z, d_model, bias=False)
        nn.init.zeros_(self.proj.weight)

    def posterior(self, h_scored: torch.Tensor, h_last: torch.Tensor | None = None):
        """q(z|.) parameters. h_scored, h_last: (B, C) layer-k states. Returns (loc, scale), each (B, d_z)."""
        if self.posterior_head is None:
            raise ValueError("the deterministic twin has no posterior: z is the prior network's mean")
        if self.prior == "conditional":
            if h_last is None:
                raise ValueError("the conditional posterior needs the state of the last target token")
            return self.posterior_head(torch.cat([h_scored, h_last], dim=-1))
        return self.posterior_head(h_scored)

    def prior_params(self, h_scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z|.) parameters, each (B, d_z): N(0, I) or the learned conditional prior."""
        if self.prior_head is None:
            zeros = h_scored.new_zeros(h_scored.shape[0], self.d_z, dtype=torch.float32)
            return zeros, torch.ones_like(zeros)
        return self.prior_head(h_scored)

    def mean(self, h_scored: torch.Tensor) -> torch.Tensor:
        """z's value at inference without noise, (B, d_z): the mean of q(z|prompt) (standard prior),
        of p(z|prompt) (conditional) or the twin's z (deterministic)."""
        loc, _ = self.posterior(h_scored) if self.prior == "standard" else self.prior_params(h_scored)
        return loc

    def inject(self, h: torch.Tensor, z: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Add proj(z) to the stream at the positions ``where``.

        Args:
            h: (B, T, C) residual stream after block k.
            z: (B, d_z) latent sample.
            where: (B, T) bool, the positions that receive z.
        """
        delta = self.proj(z.to(self.proj.weight.dtype)).to(h.dtype)  # (B, C)
        return h + where.unsqueeze(-1).to(h.dtype) * delta.unsqueeze(1)  # (B, T, C)


def kl_normal(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """KL(N(q) || N(p)) per dimension, (B, d_z), in the dtype of ``q_loc``.

    ½(r − 1 − log r + ((μ_q − μ_p)/σ_p)²) with r = σ_q²/σ_p², its first part taken as
    expm1(u) − u, u = log r, in float64: near q = p the naive r − 1 − log r subtracts numbers
    of order 1 to leave one of order u², and in float32 it was 0.9% off at u = 2e-5 (σ_q/σ_p = 1 + 1e-5).
    """
    u = 2 * (q_scale.double().log() - p_scale.double().log())  # log r
    shift = ((q_loc.double() - p_loc.double()) / p_scale.double()).pow(2)
    return (0.5 * (torch.expm1(u) - u + shift)).to(q_loc.dtype)
