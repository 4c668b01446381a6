"""The Gaussian latent between blocks: identity at init, what trains, the ELBO by hand, active units."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vtrans.backbone import tokens
from vtrans.latent.elbo import ELBOInputs, free_bits_penalty, make_loss
from vtrans.latent.gaussian import GaussianLatent, kl_normal
from vtrans.latent.module import LatentLM
from vtrans.latent.stats import ACTIVE_UNIT_THRESHOLD, LatentStats

BATCH = {
    "prompt": ["Complete the idiom: a piece of", "Hi", "Complete the idiom: once in a blue"],
    "target": ["cake", "there friend", "moon"],
}
D_Z = 4


def latent_lm(backbone, prior="conditional", **kw) -> LatentLM:
    torch.manual_seed(0)
    module = LatentLM(backbone, d_z=D_Z, prior=prior, hidden=16, **kw)
    module.log = lambda *args, **kwargs: None  # no Trainer here
    module.log_dict = lambda *args, **kwargs: None
    return module


def perturb_encoders(module: LatentLM, seed: int = 1) -> None:
    """Random encoder weights (q and p away from N(0, I)); ``proj`` stays as it is."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.model.latent.named_parameters():
            if not name.startswith("proj"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def perturb_proj(module: LatentLM, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = module.model.latent.proj.weight
        w.copy_(torch.randn(w.shape, generator=gen))


def batch_inputs(module: LatentLM):
    enc = module.model.encode(BATCH["prompt"], module.model.target_ids(BATCH["target"]))
    return enc, module.model.lower(enc)  # (B, T, C)


@torch.no_grad()
def base_logits(backbone, enc: tokens.Encoded) -> torch.Tensor:
    out = backbone.model(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids, use_cache=False
    )
    return tokens.slot_positions(out.logits, enc)  # (B, N, V)


def target_nll(logits: torch.Tensor, enc: tokens.Encoded) -> torch.Tensor:
    """-Σ log p(target | prompt, z), summed over the real target tokens and the batch."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, enc.targets.unsqueeze(-1)).squeeze(-1)  # (B, N)
    return -(logp * enc.target_mask).sum()


# --------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("prior", ["standard", "conditional"])
def test_untrained_latent_leaves_the_logits_unchanged(tiny_backbone, prior):
    module = latent_lm(tiny_backbone, prior).eval()
    enc, h = batch_inputs(module)
    assert enc.targets.shape[1] == 2 and not enc.target_mask.all()  # mixed target lengths
    z = torch.randn(enc.targets.shape[0], D_Z) * 3
    with torch.no_grad():
        logits = module.model.decode(h, z, enc)  # (B, N, V)
    torch.testing.assert_close(logits, base_logits(tiny_backbone, enc), atol=1e-5, rtol=0)


def test_a_trained_projection_makes_the_logits_depend_on_z(tiny_gpt2):
    """The identity above is not vacuous: once proj is non-zero, z reaches the logits."""
    module = latent_lm(tiny_gpt2).eval()
    perturb_proj(module)
    enc, h = batch_inputs(module)
    z = torch.randn(enc.targets.shape[0], D_Z)
    with torch.no_grad():
        moved = module.model.decode(h, z, enc)
    assert (moved - base_logits(tiny_gpt2, enc)).abs().max() > 1e-2


def test_untrained_encoders_start_at_the_standard_normal():
    latent = GaussianLatent(d_model=64, d_z=D_Z, prior="conditional", hidden=16)
    h = torch.randn(5, 64)
    for loc, scale in (latent.posterior(h, torch.randn(5, 64)), latent.prior_params(h)):
        torch.testing.assert_close(loc, torch.zeros(5, D_Z), atol=0, rtol=0)
        torch.testing.assert_close(scale, torch.ones(5, D_Z), atol=1e-6, rtol=0)
    q = latent.posterior(h, torch.randn(5, 64))
    assert kl_normal(*q, torch.zeros(5, D_Z), torch.ones(5, D_Z)).abs().max() < 1e-10


def test_inject_touches_only_the_chosen_positions():
    latent = GaussianLatent(d_model=8, d_z=2, prior="standard", hidden=4)
    with torch.no_grad():
        latent.proj.weight.fill_(1.0)
    h = torch.zeros(2, 3, 8)
    where = torch.tensor([[False, True, True], [False, False, True]])
    out = latent.inject(h, torch.tensor([[1.0, 2.0], [0.5, 0.5]]), where)
    assert out[0, 0].abs().sum() == 0 and out[1, :2].abs().sum() == 0
    torch.testing.assert_close(out[0, 1:], torch.full((2, 8), 3.0))
    torch.testing.assert_close(out[1, 2], torch.full((8,), 1.0))


# --------------------------------------------------------------------------- what trains, what is saved


@pytest.mark.parametrize("prior", ["standard", "conditional"])
def test_only_the_latent_trains(tiny_backbone, prior):
    pyro.clear_param_store()
    module = latent_lm(tiny_backbone, prior).train()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"model.latent." + n for n, _ in module.model.latent.named_parameters()}
    assert any(n.startswith("model.latent.proj") for n in trainable)
    assert (prior == "conditional") == any(n.startswith("model.latent.prior_head") for n in trainable)

    loss = module._shared_step(BATCH, "train")
    loss.backward()
    got_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    assert got_grad == trainable
    assert module.model.latent.proj.weight.grad.abs().sum() > 0  # the signal reaches the injection
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert len(pyro.get_param_store().keys()) == 0  # Pyro holds no parameter, backbone least of all

    optimizer = module.configure_optimizers()
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(list(module.model.latent.parameters()))
    assert {id(p) for p in in_optimizer} == {id(p) for p in module.model.latent.parameters()}

    state = module.state_dict()  # the latent model's, keys as it names them: a checkpoint reads as one of it
    assert state and not any("backbone." in k for k in state)
    assert {f"model.{k}" for k in state if k.startswith("latent.")} == trainable
    assert state.keys() == module.model.state_dict().keys()


def test_a_state_dict_with_backbone_weights_is_refused(tiny_gpt2):
    module = latent_lm(tiny_gpt2)
    state = dict(module.state_dict())
    state["backbone.model.lm_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="backbone weights"):
        module.load_state_dict(state)


# --------------------------------------------------------------------------- the ELBO


def test_kl_normal_is_the_gaussian_kl():
    gen = torch.Generator().manual_seed(0)
    q_loc, p_loc = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    q_scale, p_scale = torch.rand(6, 5, generator=gen) + 0.1, torch.rand(6, 5, generator=gen) + 0.1
    expected = kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale))
    torch.testing.assert_close(kl_normal(q_loc, q_scale, p_loc, p_scale), expected)
    assert kl_normal(q_loc, q_scale, q_loc, q_scale).abs().max() < 1e-6


def test_kl_normal_keeps_its_digits_near_q_equal_p():
    """σ_q/σ_p = 1 + δ: KL = ½(expm1(u) − u) with u = 2 log(1 + δ), about δ² (1e-10 at δ = 1e-5).

    The naive ½(r − 1 − log r) in float32 subtracts numbers of order 1 and was 0.9% off at
    δ = 1e-5; the reference is the series of the same expression in float64, so 1e-6 relative
    holds on any CPU (float32's final rounding is 6e-8).
    """
    delta = torch.tensor([1e-5, 1e-4, 3e-3], dtype=torch.float64)
    u = 2 * torch.log1p(delta)
    expected = 0.5 * (u.pow(2) / 2 + u.pow(3) / 6 + u.pow(4) / 24)  # expm1(u) − u to O(u⁵)
    p_scale = torch.full((3,), 0.7, dtype=torch.float64)
    got = kl_normal(torch.zeros(3), (p_scale * (1 + delta)).float(), torch.zeros(3), p_scale.float())
    # the float32 scales themselves are rounded: compare with the KL of the scales actually given
    u32 = 2 * ((p_scale * (1 + delta)).float().double().log() - p_scale.float().double().log())
    exact = 0.5 * (u32.pow(2) / 2 + u32.pow(3) / 6 + u32.pow(4) / 24)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)
    assert (got > 0).all() and torch.allclose(exact, expected, rtol=0.05)


class Recorder:
    """A decode function that remembers the z Pyro drew."""

    def __init__(self, module: LatentLM, h: torch.Tensor, enc: tokens.Encoded) -> None:
        self.module, self.h, self.enc, self.z = module, h, enc, []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.z.append(z.detach().clone())
        return self.module.model.decode(self.h, z, self.enc)


def _elbo_setup(backbone):
    module = latent_lm(backbone, "conditional").eval()
    perturb_encoders(module)
    perturb_proj(module)  # the NLL depends on z, so it must be evaluated at the z Pyro drew
    enc, h = batch_inputs(module)
    with torch.no_grad():
        q_loc, q_scale, p_loc, p_scale = module.model.distributions(h, enc)
    return module, enc, h, (q_loc, q_scale, p_loc, p_scale)


@torch.no_grad()
def test_meanfield_loss_is_nll_plus_beta_kl(tiny_gpt2):
    module, enc, h, params = _elbo_setup(tiny_gpt2)
    kl = kl_normal(*params).sum()
    assert kl > 1.0
    loss_fn = make_loss("meanfield")
    losses = {}
    for beta in (0.5, 1.0, 2.0):
        decode = Recorder(module, h, enc)
        torch.manual_seed(0)
        losses[beta] = loss_fn(ELBOInputs(*params, decode, enc.targets, enc.target_mask, beta))
        (z,) = decode.z
        by_hand = target_nll(module.model.decode(h, z, enc), enc) + beta * kl
        torch.testing.assert_close(losses[beta], by_hand)
    # same seed, same z: the difference is exactly the analytic KL
    torch.testing.assert_close(losses[2.0] - losses[1.0], kl)
    torch.testing.assert_close(losses[1.0] - losses[0.5], 0.5 * kl)


@torch.no_grad()
def test_trace_loss_is_nll_plus_beta_log_ratio(tiny_gpt2):
    module, enc, h, (q_loc, q_scale, p_loc, p_scale) = _elbo_setup(tiny_gpt2)
    decode = Recorder(module, h, enc)
    beta = 1.5
    loss = make_loss("trace")(ELBOInputs(q_loc, q_scale, p_loc, p_scale, decode, enc.targets, enc.target_mask, beta))
    (z,) = decode.z
    log_ratio = Normal(q_loc, q_scale).log_prob(z).sum() - Normal(p_loc, p_scale).log_prob(z).sum()
    torch.testing.assert_close(loss, target_nll(module.model.decode(h, z, enc), enc) + beta * log_ratio)


def test_free_bits_penalty_value_and_gradient():
    kl = torch.tensor([[0.0, 0.3, 2.0], [0.2, 0.1, 1.0]], requires_grad=True)  # KL̄_d = 0.1, 0.2, 1.5
    lam = 0.25
    penalty = free_bits_penalty(kl, lam)
    torch.testing.assert_close(penalty, torch.tensor(0.15 + 0.05 + 0.0))
    objective = kl.mean(0).sum() + penalty  # what the module minimises, per item
    torch.testing.assert_close(objective, torch.tensor(lam + lam + 1.5))  # Σ_d max(λ, KL̄_d)
    objective.backward()
    # below λ a dimension is free: no gradient pushes its KL down
    torch.testing.assert_close(kl.grad, torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]))
    assert free_bits_penalty(kl, 0.0) == 0


@pytest.mark.parametrize("free_bits", [0.0, "median"])
def test_module_loss_is_nll_plus_beta_sum_of_max_lambda_kl(tiny_llama, free_bits):
    """The objective of a training step, by hand: NLL/B + β Σ_d max(λ, KL̄_d) (proj = 0: NLL is the base's)."""
    beta = 0.7
    module = latent_lm(tiny_llama, "conditional", beta=beta).train()
    perturb_encoders(module)
    enc, h = batch_inputs(module)
    with torch.no_grad():
        kl_dim = kl_normal(*module.model.distributions(h, enc))  # (B, d_z)
    kl_bar = kl_dim.mean(0)
    lam = kl_bar.median().item() if free_bits == "median" else 0.0
    module.hparams.free_bits = lam
    n = enc.targets.shape[0]

    torch.manual_seed(0)
    loss = module._shared_step(BATCH, "train")
    nll = target_nll(base_logits(tiny_llama, enc), enc) / n
    torch.testing.assert_close(loss, nll + beta * torch.clamp(kl_bar, min=lam).sum(), atol=1e-5, rtol=1e-6)
    # the logged metrics: NLL per item, KL per item (without free bits), ELBO = -(NLL + KL)
    torch.testing.assert_close(module.means["train_nll"].compute(), nll, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(module.means["train_kl"].compute(), kl_bar.sum(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(module.means["train_elbo"].compute(), -(nll + kl_bar.sum()), atol=1e-5, rtol=1e-6)


def test_kl_warmup_starts_small(tiny_gpt2):
    module = latent_lm(tiny_gpt2, beta=2.0, kl_warmup_steps=4).train()
    assert module.current_beta() == pytest.approx(0.5)  # step 0: β/steps
    assert module.eval().current_beta() == 2.0  # validation uses the full β


# --------------------------------------------------------------------------- active units


def test_active_units_count_the_dimensions_whose_posterior_mean_varies():
    # per-dimension population variance of q_loc over the epoch: 0, 0.04, 0.0025, 1.0, 0.0144
    spread = torch.tensor([0.0, 0.2, 0.05, 1.0, 0.12])
    offset = torch.tensor([3.0, -1.0, 0.5, 0.0, 7.0])  # the mean does not matter
    assert ACTIVE_UNIT_THRESHOLD == 0.01
    stats = LatentStats(d_z=5)
    kl = torch.arange(5, dtype=torch.float32).expand(4, 5)
    # two batches, each constant: within a batch nothing varies, across the epoch it does
    stats.update(offset + spread.expand(4, 5), kl)
    stats.update(offset - spread.expand(4, 5), 3 * kl)
    values = stats.compute()
    assert values["active_units"].item() == 3  # 0.04, 1.0 and 0.0144 exceed 0.01
    torch.testing.assert_close(values["active_fraction"], torch.tensor(0.6))
    torch.testing.assert_close(values["kl_dim"], 2 * torch.arange(5, dtype=torch.float32))
    assert values["kl_dim_max"].item() == 8 and values["kl_dim_min"].item() == 0
    stats.reset()
    stats.update(offset.expand(3, 5), kl[:3])
    assert stats.compute()["active_units"].item() == 0
