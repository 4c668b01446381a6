"""The spread of a Laplace posterior over the prior network's output weights (``vtrans.latent.laplace``).

Fitted after training on the latent's own training prompts (``vtrans crossval`` does it for each
fold's latent). For a prompt, the prior's location m(x) has the predictive N(m*(x), diag v(x)),
v_d(x) = φ(x)ᵀ H_d⁻¹ φ(x):

* ``laplace_loc_var``: the mean over dimensions of v(x), the location's own spread (no extra pass);
* over S draws m_s = m*(x) + √v(x)·ε_s (each item's ε from its own seed), with z at m_s,
  p_s(·) = p(·|prompt, z = m_s): ``laplace_nll`` = −log (1/S) Σ_s p_s(ŷ) (the mean), ``laplace_var``
  the variance over draws of log p_s(ŷ), and ``laplace_mi`` = (1/S) Σ_s KL(p_s ‖ p̄), the mutual
  information between the next token and the weights.
"""

from __future__ import annotations

import torch

from vtrans.estimators.base import Context, Family, Forward, Posterior, Shown
from vtrans.estimators.common import predictive_stats
from vtrans.estimators.latent import item_noise, layer_state, sample_chunks
from vtrans.latent import laplace
from vtrans.latent.laplace import features

NOISE_STREAM = 0x1A91  # these draws' seeds differ from the z draws' of the same item

POSTERIOR = Posterior(
    "laplace",
    "a Laplace posterior fitted on the latent's training prompts (vtrans crossval fits one per fold)",
    lambda latent, data: laplace.fit(latent, data.train_prompts),
)


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    module, enc, cfg = context.module, forward.enc, context.config
    h = layer_state(forward, module)
    h_scored = module.states(h, enc)[0]
    loc, _ = module.latent.prior_params(h_scored)  # (B, d_z) at the trained weights
    variance = context.posteriors["laplace"].location_variance(features(module, h_scored)).to(loc)  # (B, d_z)
    eps = item_noise(context.indices, cfg.samples, loc.shape[1], cfg.seed + NOISE_STREAM).to(loc)
    z = loc.unsqueeze(1) + variance.sqrt().unsqueeze(1) * eps  # (B, S, d_z)
    logits = torch.cat([part for _, part in sample_chunks(module, h, enc, forward.cache, z)])
    stats = predictive_stats(logits, forward.y.to(logits.device))
    return {
        "laplace_loc_var": variance.mean(-1),
        "laplace_nll": stats["nll"],
        "laplace_var": stats["log_var"],
        "laplace_mi": stats["mi"],
    }


FAMILY = Family(
    "laplace",
    {
        "laplace_loc_var": "mean Laplace variance of the prior's location: how far the prompt is from the training prompts",
        "laplace_nll": "−log E_W p(ŷ) over S draws of the prior network's output weights from their Laplace posterior",
        "laplace_var": "variance of log p(ŷ) over S draws of the prior network's output weights",
        "laplace_mi": "mutual information between the next token and the prior network's output weights",
    },
    read,
    needs=frozenset({"latent", "conditional_prior", "hidden_states", "cache"}),
    extra_passes=True,
    first_token_only=True,
    posterior=POSTERIOR,
    shown=Shown(default_score=False),
)
