"""The prior's spread refit on held-out idioms (``vtrans.latent.refit``).

* ``refit_prior_var``: the mean over dimensions of the refit prior's variance s(x)² at the scored
  position: the prior's expected miss on a new prompt (``posterior_var`` is the same mean of
  the prior as trained, for a conditional-prior latent);
* over S draws z_s ~ N(m(x), diag s_refit(x)²) (each item's noise from its own seed, the z draws'
  stream), p_s(·) = p(·|prompt, z_s): ``refit_var``, the variance over draws of log p_s(ŷ);
  ``refit_mi`` = (1/S) Σ_s KL(p_s ‖ p̄), the mutual information between the next token and z; and
  ``refit_nll`` = −log (1/S) Σ_s p_s(ŷ), their mean.
"""

from __future__ import annotations

import torch

from vtrans.estimators.base import Context, Family, Forward, Posterior, Shown
from vtrans.estimators.common import predictive_stats
from vtrans.estimators.latent import item_noise, layer_state, sample_chunks
from vtrans.latent import refit
from vtrans.latent.laplace import features

REFIT = Posterior(
    "refit",
    "the prior's spread refit on idioms the latent never trained on (crossval --refit_spread)",
    lambda latent, data: refit.fit(latent, data.held_prompts, data.held_targets),
    held_out=True,
    describe=lambda fitted: {
        "refit_items": fitted.n_items, "refit_kl_before": fitted.kl_before, "refit_kl_after": fitted.kl_after
    },
)


def _prior(forward: Forward, context: Context):
    module = context.module
    h = layer_state(forward, module)
    h_scored = module.states(h, forward.enc)[0]
    loc, _ = module.latent.prior_params(h_scored)
    return h, loc, context.posteriors["refit"].scale(features(module, h_scored)).to(loc)


def read_prior(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    _, _, refit_scale = _prior(forward, context)
    return {"refit_prior_var": refit_scale.pow(2).mean(-1)}


def read_samples(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    module, enc, cfg = context.module, forward.enc, context.config
    h, loc, scale = _prior(forward, context)
    eps = item_noise(context.indices, cfg.samples, loc.shape[1], cfg.seed, cfg.z_draws).to(loc)
    z = loc.unsqueeze(1) + scale.unsqueeze(1) * eps  # (B, S, d_z)
    logits = torch.cat([part for _, part in sample_chunks(module, h, enc, forward.cache, z)])
    stats = predictive_stats(logits, forward.y.to(logits.device))
    return {"refit_var": stats["log_var"], "refit_mi": stats["mi"], "refit_nll": stats["nll"]}


PRIOR = Family(
    "prior_spread",
    {"refit_prior_var": "mean variance of the prior p(z|prompt) refit on held-out idioms: its expected miss"},
    read_prior,
    needs=frozenset({"latent", "variational", "conditional_prior", "hidden_states"}),
    posterior=REFIT,
    shown=Shown(default_score=False),
)
SAMPLES = Family(
    "refit_samples",
    {
        "refit_var": "variance of log p(ŷ) over S samples of z from the refit prior",
        "refit_mi": "mutual information between the next token and z from the refit prior",
        "refit_nll": "−log E_z p(ŷ) over S samples of z from the refit prior",
    },
    read_samples,
    needs=frozenset({"latent", "variational", "conditional_prior", "hidden_states", "cache"}),
    extra_passes=True,
    first_token_only=True,
    posterior=REFIT,
    shown=Shown(default_score=False),
)
