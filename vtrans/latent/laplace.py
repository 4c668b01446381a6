"""A Laplace posterior over the prior network's output weights: the latent made Bayesian after training.

The conditional prior p(z|prompt) = N(m(x), diag s(x)²) ends in a linear layer; its location rows
give m_d(x) = w_dᵀ φ(x), φ(x) the layer's input with a 1 appended (the bias). Training reaches
those rows only through β·KL(q(z|x, y) ‖ p(z|x)), which is, in w_d, a weighted least-squares term
Σ_i β (w_dᵀ φ_i − μ_{q,i,d})² / (2 s_{i,d}²). Its Hessian is exact and constant in w_d:

    H_d = β Σ_i φ_i φ_iᵀ / s_{i,d}²  + λ I          (λ: the Gaussian prior's precision on w_d)

so the Laplace approximation around the trained weights w_d* is N(w_d*, H_d⁻¹), one (h+1)×(h+1)
matrix per dimension of z (h the prior network's width). A new prompt's prior location then has
the predictive m_d(x) ~ N(w_d*ᵀ φ(x), φ(x)ᵀ H_d⁻¹ φ(x)): narrow where the training prompts'
features cover φ(x), wide where they do not. The scale rows and the layers below stay at their
trained values (a last-layer Laplace of the location only), and the free-bits floor of training
is left out of H (it acts on the batch's mean KL, not on an item's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtrans.backbone.tokens import encode


@dataclass
class LaplacePosterior:
    """The Laplace posterior of the prior network's location rows.

    Attributes:
        chol: (d_z, h+1, h+1) float64, the Cholesky factor L_d of each H_d = L_d L_dᵀ.
        n_items: the training prompts it was fitted on.
        prior_precision: λ.
    """

    chol: torch.Tensor
    n_items: int
    prior_precision: float

    def location_variance(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, d_z) φᵀ H_d⁻¹ φ for features φ (B, h+1): the variance of each prior location."""
        d_z, n, _ = self.chol.shape
        rhs = phi.double().T.unsqueeze(0).expand(d_z, n, -1)  # (d_z, h+1, B)
        solved = torch.linalg.solve_triangular(self.chol.to(phi.device), rhs, upper=False)  # L⁻¹ φ
        return solved.pow(2).sum(1).T.float()  # (B, d_z)


def features(module, h_scored: torch.Tensor) -> torch.Tensor:
    """(B, h+1) the prior network's last layer's input at the scored states (B, C), with a 1 appended."""
    head = module.latent.prior_head
    phi = head.net[:-1](head.norm(h_scored.float()))
    return torch.cat([phi, phi.new_ones(phi.shape[0], 1)], -1)


@torch.no_grad()
def scored_states(module, prompts: list[str]) -> torch.Tensor:
    """(n, C) the stream after block k at each prompt's last token, each prompt on its own (its
    values do not depend on which prompts share a batch)."""
    rows = []
    for prompt in prompts:
        enc = encode(module.tokenizer, [prompt], None, module.device)
        rows.append(module.lower(enc)[0, -1])
    return torch.stack(rows)


@torch.no_grad()
def fit(module, prompts: list[str], prior_precision: float = 1.0) -> LaplacePosterior:
    """The Laplace posterior of a conditional-prior latent's location rows from its training prompts."""
    if module.latent.prior != "conditional":
        raise ValueError(f"a Laplace posterior of the prior network needs prior: conditional, got {module.latent.prior!r}")
    h = scored_states(module, prompts)
    phi = features(module, h).double()  # (n, h+1)
    _, scale = module.latent.prior_params(h)  # (n, d_z)
    beta = float(module.settings.get("beta", 1.0))
    weights = beta / scale.double().pow(2)  # (n, d_z)
    hessian = torch.einsum("nd,ni,nj->dij", weights, phi, phi)  # (d_z, h+1, h+1)
    hessian = hessian + prior_precision * torch.eye(phi.shape[1], dtype=torch.float64)
    return LaplacePosterior(torch.linalg.cholesky(hessian).cpu(), len(prompts), prior_precision)
