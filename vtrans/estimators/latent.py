"""Estimators read off the trained latent.

* ``posterior_var``: mean variance of the inference distribution of z at the scored position
  (q(z|prompt) for the standard prior, the learned p(z|prompt) for the conditional one);
* ``latent_mi``: mutual information between the next token and z over S samples,
  H(E_z p(·|prompt, z)) − E_z H(p(·|prompt, z));
* ``latent_nll``: −log E_z p(ŷ|prompt, z) over the same S samples: the latent predictive's
  surprise at the model's own answer, its total uncertainty (the output's and z's together)
  where ``latent_mi`` is z's share alone;
* ``latent_kl`` (conditional prior only): KL(q(z|prompt, ŷ) ‖ p(z|prompt)), how much the
  model's own answer surprises the prior.
"""

from __future__ import annotations

from typing import Literal

import torch

from vtrans.estimators.common import predictive_stats
from vtrans.latent import kl_normal
from vtrans.tokens import Encoded

ZDraws = Literal["random", "antithetic", "sobol"]


def inference_distribution(module, h: torch.Tensor, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of z at inference: q(z|prompt) (standard) or p(z|prompt) (conditional)."""
    h_scored, _ = module.states(h, enc)
    if module.latent.prior == "standard":
        return module.latent.posterior(h_scored)
    return module.latent.prior_params(h_scored)


def first_slot_logits(logits: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """(B, N, V) slot logits -> (B, V) at each item's first slot (the scored position)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, enc.first_slot]


@torch.no_grad()
def scores(
    module,
    enc: Encoded,
    samples: int = 32,
    seed: int = 0,
    chunk: int = 512,
    mi: bool = True,
    generator: torch.Generator | None = None,
    draws: ZDraws = "random",
) -> dict[str, torch.Tensor]:
    """All latent estimators for a batch whose targets are the base model's completion tokens.

    Attention is causal, so the states and logits at the scored position do not depend on the
    completion tokens that follow it: one pass through the lower blocks serves the prompt-only
    estimators and ``latent_kl`` (which reads the state of the last completion token).

    Args:
        mi: compute ``latent_mi`` and ``latent_nll`` (S passes of the upper blocks); ``False`` leaves out the
            sampling and gives only the encoders' estimators (the probe's features).
        generator: the source of the z noise, owned by the caller for a whole run so that
            successive batches draw fresh noise; ``None`` seeds a new one from ``seed`` (a
            standalone call: every call then draws the same noise).
        draws: how the S standard-normal draws of z's noise are made (see :func:`z_noise`).
    """
    h = module.lower(enc)  # (B, T, C), computed once for every sample
    loc, scale = inference_distribution(module, h, enc)
    result = {"posterior_var": scale.pow(2).mean(-1)}
    if mi:
        generator = generator or _generator(seed, loc.device)
        stats = _predictive(module, h, enc, loc, scale, samples, chunk, generator, draws)
        result["latent_mi"], result["latent_nll"] = stats["mi"], stats["nll"]
    if module.latent.prior == "conditional":
        q_loc, q_scale, p_loc, p_scale = module.distributions(h, enc)
        result["latent_kl"] = kl_normal(q_loc, q_scale, p_loc, p_scale).sum(-1)
    return result


def _generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def z_noise(
    items: int, samples: int, d_z: int, generator: torch.Generator, draws: ZDraws = "random"
) -> torch.Tensor:
    """(items, samples, d_z) standard-normal noise for z = loc + scale·ε.

    ``random``: independent draws. ``antithetic``: pairs ε, −ε (the odd moments of each pair
    cancel). ``sobol``: a scrambled Sobol point set mapped through the normal quantile, shifted
    by a random offset modulo 1 per item (a randomised quasi-Monte Carlo rule: unbiased, and the
    S points cover the space more evenly than independent ones).
    """
    device = generator.device
    if draws == "random":
        return torch.randn((items, samples, d_z), generator=generator, device=device)
    if draws == "antithetic":
        half = torch.randn((items, (samples + 1) // 2, d_z), generator=generator, device=device)
        return torch.cat([half, -half], 1)[:, :samples]
    if draws == "sobol":
        scramble_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
        points = torch.quasirandom.SobolEngine(d_z, scramble=True, seed=scramble_seed).draw(samples)  # (S, d_z)
        shift = torch.rand((items, 1, d_z), generator=generator, device=device)
        u = (points.to(device).unsqueeze(0) + shift) % 1.0  # (items, S, d_z)
        u = u.clamp(1e-6, 1 - 1e-6)
        return torch.special.ndtri(u)
    raise ValueError(f"draws must be random, antithetic or sobol, got {draws!r}")


def _predictive(
    module, h, enc: Encoded, loc, scale, samples: int, chunk: int, generator: torch.Generator, draws: ZDraws = "random"
) -> dict[str, torch.Tensor]:
    """:func:`predictive_stats` over S samples of z ~ N(loc, scale²), each (B,); the noise is drawn from ``generator``."""
    eps = z_noise(loc.shape[0], samples, loc.shape[1], generator, draws).to(loc.dtype)
    z = (loc.unsqueeze(1) + scale.unsqueeze(1) * eps).flatten(0, 1)  # (B*S, d_z)
    prefix = module.prefix(h, enc)  # the upper blocks before the scored positions, once for all samples
    logits = []
    items_per_chunk = max(1, chunk // samples)
    for start in range(0, loc.shape[0], items_per_chunk):
        stop = min(start + items_per_chunk, loc.shape[0])
        part = enc.slice(start, stop).repeat(samples)
        part_prefix = prefix.rows(start, stop).repeat(samples)
        h_part = h[start:stop].repeat_interleave(samples, 0)  # (b*S, T, C)
        slot_logits = module.decode(h_part, z[start * samples : stop * samples], part, part_prefix)  # (b*S, N, V)
        logits.append(first_slot_logits(slot_logits, part).float())
    logits = torch.cat(logits).view(loc.shape[0], samples, -1)  # (B, S, V)
    y = first_slot_logits(enc.targets.unsqueeze(-1), enc).squeeze(-1)  # (B,) ŷ
    return predictive_stats(logits, y)
