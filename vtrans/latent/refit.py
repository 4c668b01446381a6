"""The prior's spread refit on idioms the latent never trained on.

Why the trained prior's spread tells nothing: p(z|prompt) = N(m(x), diag s(x)²) learns s(x)
from β·KL(q(z|x, y) ‖ p(z|x)) on the training idioms alone, where the prior network has learnt
where the posterior, which sees the answer y, puts z. There s(x) shrinks toward the posterior's
own width on every idiom; on a new prompt it repeats what it learnt on memorised ones, and says
nothing of how far its guess m(x) is from the answer.

The refit gives s(x) the one thing it should learn: on idioms the latent did *not* train on (a
held-out share of its training fold), how far the posterior lands from the prior's guess. With
m(x) and the posterior fixed, the KL is minimised over the scale rows W (d_z × (h+1)) of the prior
network's last layer, s_d(x) = softplus(w_dᵀ φ(x)) + s_min (φ(x) that layer's input with a 1
appended, as in :mod:`vtrans.laplace`):

    Σ_i Σ_d KL(N(μ_{q,i,d}, σ²_{q,i,d}) ‖ N(m_d(x_i), s_d(x_i)²)) + λ/2 ‖W − W*‖²

whose per-item optimum is s_d² = σ²_q + (μ_q − m_d)²: the prior's expected miss. λ (the Gaussian
prior's precision on W around the trained rows W*, 1 as the Laplace posterior's) keeps a fit on a
few hundred idioms near the trained rows. L-BFGS in float64, full batch: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtrans.backbone.tokens import encode
from vtrans.latent.laplace import features

HELD_OUT = 3
"""A latent trained with a refit spread trains on all but 1/HELD_OUT of its training idioms; the
spread is refit on that last third (``vtrans crossval --refit_spread``)."""


@dataclass
class RefitScale:
    """The refit scale rows of the prior network's last layer.

    Attributes:
        weight: (d_z, h+1) float64, the scale rows with the bias as the last column.
        min_scale: the head's floor s_min.
        n_items: the held-out idioms it was fitted on.
        kl_before, kl_after: their mean KL (nats per item) at the trained rows and at the refit ones.
    """

    weight: torch.Tensor
    min_scale: float
    n_items: int
    kl_before: float
    kl_after: float

    def scale(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, d_z) the refit prior's scale at features φ (B, h+1)."""
        return (F.softplus(phi.double() @ self.weight.to(phi.device).T) + self.min_scale).float()


def trained_rows(module) -> torch.Tensor:
    """(d_z, h+1) float64: the trained scale rows W* (bias last)."""
    last, d_z = module.latent.prior_head.net[-1], module.latent.d_z
    return torch.cat([last.weight[d_z:], last.bias[d_z:, None]], 1).detach().double().cpu()


@torch.no_grad()
def held_out_distributions(module, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, ...]:
    """The posterior (loc, scale), the prior's location and the features φ of each held-out idiom,
    float64 on the CPU, each idiom on its own (its values do not depend on which idioms share a batch)."""
    rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        enc = encode(module.tokenizer, [prompt], module.target_ids([target]), module.device)
        h = module.lower(enc)
        q_loc, q_scale, p_loc, _ = module.distributions(h, enc)
        phi = features(module, module.states(h, enc)[0])
        rows.append(torch.cat([q_loc, q_scale, p_loc, phi], -1)[0].double().cpu())
    d_z = module.latent.d_z
    table = torch.stack(rows)
    return table[:, :d_z], table[:, d_z : 2 * d_z], table[:, 2 * d_z : 3 * d_z], table[:, 3 * d_z :]


def kl_to(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """(n,) Σ_d KL(N(q_loc, q_scale²) ‖ N(p_loc, p_scale²))."""
    ratio = (q_scale / p_scale).pow(2)
    return 0.5 * (ratio + ((q_loc - p_loc) / p_scale).pow(2) - 1 - ratio.log()).sum(-1)


def fit(module, prompts: list[str], targets: list[str], prior_precision: float = 1.0, max_iter: int = 200) -> RefitScale:
    """The prior's scale rows refit on held-out idioms (their prompts and target words)."""
    if module.latent.prior != "conditional":
        raise ValueError(f"refitting the prior's spread needs prior: conditional, got {module.latent.prior!r}")
    if not prompts:
        raise ValueError("refitting the prior's spread needs held-out idioms, got none")
    q_loc, q_scale, p_loc, phi = held_out_distributions(module, prompts, targets)
    start = trained_rows(module)
    min_scale = float(module.latent.prior_head.min_scale)
    weight = start.clone().requires_grad_(True)

    def objective(w: torch.Tensor) -> torch.Tensor:
        scale = F.softplus(phi @ w.T) + min_scale
        return kl_to(q_loc, q_scale, p_loc, scale).mean() + prior_precision / (2 * len(prompts)) * (w - start).pow(2).sum()

    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        before = float(kl_to(q_loc, q_scale, p_loc, F.softplus(phi @ start.T) + min_scale).mean())
        after = float(kl_to(q_loc, q_scale, p_loc, F.softplus(phi @ weight.T) + min_scale).mean())
    return RefitScale(weight.detach(), min_scale, len(prompts), before, after)
