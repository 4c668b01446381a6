"""The Laplace posterior of the prior network's location rows (``vtrans.latent.laplace``) and its family:
the Hessian and the variances against float64 algebra by hand, a variance that falls when the
prompt joins the training prompts, and the family's read against forwards by hand."""

from __future__ import annotations

import torch
from test_adapter import PROMPTS, logits_with_z, own_tokens, randomized
from test_ensemble import stats_by_hand
from torch.testing import assert_close

from vtrans.estimators import laplace as laplace_family
from vtrans.estimators.base import context_for, run_forward
from vtrans.estimators.latent import item_noise
from vtrans.estimators.registry import why_not
from vtrans.latent import laplace

TRAINING = [
    "Complete the idiom: once in a blue",
    "Complete the idiom: break the",
    "Complete the idiom: the early bird catches the",
    "Complete the idiom: spill the",
]


def test_the_hessian_and_the_variances_equal_the_algebra_by_hand(tiny_gpt2):
    module = randomized(tiny_gpt2, "conditional")
    posterior = laplace.fit(module, TRAINING, prior_precision=2.0)
    h = laplace.scored_states(module, TRAINING)
    phi = laplace.features(module, h).double()  # (n, 17)
    _, scale = module.latent.prior_params(h)
    for d in range(module.latent.d_z):
        hessian = sum(torch.outer(phi[i], phi[i]) / scale[i, d].double() ** 2 for i in range(len(TRAINING)))
        hessian = hessian + 2.0 * torch.eye(phi.shape[1], dtype=torch.float64)
        chol = posterior.chol[d]
        assert_close(chol @ chol.T, hessian, rtol=1e-10, atol=1e-10)  # float64 throughout
    x = laplace.features(module, laplace.scored_states(module, PROMPTS))
    got = posterior.location_variance(x)
    covariances = torch.linalg.inv(posterior.chol @ posterior.chol.transpose(1, 2))  # (d_z, 17, 17)
    expected = torch.einsum("bi,dij,bj->bd", x.double(), covariances, x.double()).float()
    assert_close(got, expected, rtol=1e-5, atol=1e-7)  # float64 inside, one float32 rounding out


def test_a_prompt_among_the_training_prompts_has_a_narrower_location(tiny_gpt2):
    """H grows by a positive semi-definite term when a prompt joins the training prompts, so that
    prompt's variance cannot rise. It falls by 1/(1 + v/s²) or more (Sherman-Morrison for the one
    term of its own; v and s² are both of order 1 here), so by well over a fifth."""
    module = randomized(tiny_gpt2, "conditional")
    x = laplace.features(module, laplace.scored_states(module, PROMPTS))
    without = laplace.fit(module, TRAINING).location_variance(x)
    with_them = laplace.fit(module, TRAINING + PROMPTS).location_variance(x)
    assert (with_them <= without * (1 + 1e-5)).all()
    assert (with_them.mean(-1) < 0.8 * without.mean(-1)).all()


def test_the_read_equals_draws_of_the_location_by_hand(tiny_gpt2):
    module = randomized(tiny_gpt2, "conditional")
    posterior = laplace.fit(module, TRAINING)
    enc, y = own_tokens(tiny_gpt2)
    samples, seed = 6, 3
    context = context_for(tiny_gpt2.model, module=module, n=len(PROMPTS))
    context.posteriors = {"laplace": posterior}
    context.config.samples, context.config.seed = samples, seed
    forward = run_forward(tiny_gpt2.model, enc, hidden_states=True, cache=True)
    got = laplace_family.FAMILY.read(forward, context)

    h = laplace.scored_states(module, PROMPTS)  # the prompts alone: their last token is the scored one
    loc, _ = module.latent.prior_params(h)
    variance = posterior.location_variance(laplace.features(module, h))
    assert_close(got["laplace_loc_var"], variance.mean(-1), rtol=1e-4, atol=1e-6)
    eps = item_noise(list(range(len(PROMPTS))), samples, loc.shape[1], seed + laplace_family.NOISE_STREAM)
    z = loc.unsqueeze(1) + variance.sqrt().unsqueeze(1) * eps
    logits = torch.stack([logits_with_z(module, enc, z[:, s]) for s in range(samples)], 1)
    expected = stats_by_hand(logits.double().numpy(), y.numpy())
    for name in ("nll", "var", "mi"):  # two float32 paths through the model (see test_adapter)
        assert_close(got[f"laplace_{name}"], torch.from_numpy(expected[f"ensemble_{name}"]).float(), rtol=1e-3, atol=1e-4)
    assert (got["laplace_mi"] > 0).all()


def test_without_a_fitted_posterior_it_does_not_run(tiny_gpt2):
    module = randomized(tiny_gpt2, "conditional")
    assert "Laplace posterior" in why_not("laplace_mi", module)
    assert "Laplace posterior" in why_not("laplace_mi", "conditional")  # a checkpoint never holds one
    assert "conditional" in why_not("laplace_mi", randomized(tiny_gpt2, "deterministic"))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    laplace.fit(module, TRAINING[:2])
    assert why_not("laplace_mi", module, posteriors=("laplace",)) is None
    after = module.state_dict()  # fitting leaves the latent as it was: the posterior is the run's, not the latent's
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
