"""The prior's spread refit on held-out idioms (``vtrans.latent.refit``) and its estimators."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vtrans.backbone.tokens import encode
from vtrans.config import EstimatorConfig
from vtrans.data import DEFAULT_TEMPLATE, load_idioms, render_prompt
from vtrans.estimators import latent as latent_estimators
from vtrans.estimators import registry, spread
from vtrans.estimators.base import run_forward
from vtrans.estimators.latent import context_for
from vtrans.latent import refit


@pytest.fixture(scope="module")
def module(tiny_ckpt):
    from vtrans.latent import checkpoint

    latent = checkpoint.load(tiny_ckpt, "cpu")
    assert latent.latent.prior == "conditional"
    return latent


def held(n: int = 12):
    items = load_idioms("builtin")[:n]
    return [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items], [it.target for it in items]


def test_the_refit_lowers_the_held_out_kl_and_reaches_its_optimum_by_hand(module):
    """With no pull toward the trained rows (λ = 0) the fit minimises the held-out KL itself: at
    its minimum the gradient of the mean KL in W is 0, which a float64 autograd check confirms;
    and the KL is lower than at the trained rows."""
    prompts, targets = held()
    fitted = refit.fit(module, prompts, targets, prior_precision=0.0, max_iter=500)
    assert fitted.n_items == len(prompts) and fitted.kl_after < fitted.kl_before
    q_loc, q_scale, p_loc, phi = refit.held_out_distributions(module, prompts, targets)
    w = fitted.weight.clone().requires_grad_(True)
    kl = refit.kl_to(q_loc, q_scale, p_loc, F.softplus(phi @ w.T) + fitted.min_scale).mean()
    (grad,) = torch.autograd.grad(kl, w)
    assert grad.abs().max() < 1e-5  # L-BFGS's stationary point, float64
    assert kl.item() == pytest.approx(fitted.kl_after, rel=1e-9)
    # the KL of one item and dimension, by hand: log(s/σ) + (σ² + (μ − m)²)/(2s²) − 1/2
    s = F.softplus(phi[0] @ fitted.weight.T) + fitted.min_scale
    by_hand = (s / q_scale[0]).log() + (q_scale[0] ** 2 + (q_loc[0] - p_loc[0]) ** 2) / (2 * s**2) - 0.5
    assert_close(refit.kl_to(q_loc[:1], q_scale[:1], p_loc[:1], s[None]), by_hand.sum()[None])


def test_a_prior_far_from_where_the_posterior_lands_is_refit_wider(module):
    """A constructed case: the held-out posteriors sit far from the prior's guess (the prior's
    location rows shifted by 3), so the refit scale must rise toward √(σ_q² + (μ_q − m)²)."""
    prompts, targets = held()
    base = refit.fit(module, prompts, targets, prior_precision=0.0)
    original = module.latent.prior_head.net[-1].bias.detach().clone()
    try:
        with torch.no_grad():
            module.latent.prior_head.net[-1].bias[: module.latent.d_z] += 3.0
        far = refit.fit(module, prompts, targets, prior_precision=0.0)
        _, _, _, phi = refit.held_out_distributions(module, prompts, targets)
    finally:
        with torch.no_grad():
            module.latent.prior_head.net[-1].bias.copy_(original)
    assert far.scale(phi).mean() > 2 * base.scale(phi).mean()
    assert far.scale(phi).mean() > 2.0  # a miss of 3 in every dimension: a scale near 3


def test_the_estimators_read_the_trained_and_the_refit_scale(module):
    prompts, targets = held(6)
    y = module.target_ids(["x"])[0][0]  # any completion token will do
    enc = encode(module.tokenizer, prompts, [[y]] * len(prompts), "cpu")
    forward = run_forward(module.backbone.model, enc, hidden_states=True, cache=True)
    config = EstimatorConfig(samples=4, seed=0)
    context = context_for(module.backbone.model, config, module, len(prompts), indices=list(range(len(prompts))))
    assert registry.why_not("refit_prior_var", module) is not None  # not refit yet
    h_scored = module.states(forward.hidden_states[module.layer], enc)[0]
    _, scale = module.latent.prior_params(h_scored)
    # the prior's spread as trained is posterior_var already (a conditional prior's inference
    # distribution without the answer): the refit starts from these rows
    trained = latent_estimators.read_encoders(forward, context)["posterior_var"]
    assert_close(trained, scale.pow(2).mean(-1))
    context.posteriors = {"refit": refit.fit(module, *held(12))}  # on the run's context: the latent is not changed
    fitted = tuple(context.posteriors)
    assert registry.why_not("refit_prior_var", module, posteriors=fitted) is None
    assert registry.why_not("refit_mi", module, posteriors=fitted) is None
    out = spread.read_prior(forward, context)
    from vtrans.latent.laplace import features

    expected = context.posteriors["refit"].scale(features(module, h_scored)).pow(2).mean(-1)
    assert_close(out["refit_prior_var"], expected)
    samples = spread.read_samples(forward, context)
    assert set(samples) == {"refit_var", "refit_mi", "refit_nll"}
    assert all(v.shape == (len(prompts),) and torch.isfinite(v).all() for v in samples.values())
    assert (samples["refit_mi"] >= 0).all()
