"""``adapter_nll`` and the deterministic twin (``prior: deterministic``): each read against a
forward computed by hand, what the twin refuses, and that maximum likelihood trains it."""

from __future__ import annotations

import copy

import pytest
import torch
from test_estimators import (
    _logits_with_z as logits_with_z,  # a hook on the model itself: not the estimators' path
)
from torch.testing import assert_close

from vtrans.backbone.generate import complete
from vtrans.backbone.tokens import encode
from vtrans.estimators import adapter
from vtrans.estimators.base import context_for, run_forward
from vtrans.estimators.registry import why_not
from vtrans.latent.model import LatentModel
from vtrans.latent.module import LatentLM

PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: kill two birds with one", "Complete the idiom: the"]


def own_tokens(backbone):
    """The prompts (left-padded: different lengths) followed by the model's own first greedy token."""
    completions = complete(backbone.model, backbone.tokenizer, PROMPTS, max_new_tokens=1)
    targets = [[c.first_token] for c in completions]
    return encode(backbone.tokenizer, PROMPTS, targets, "cpu"), torch.tensor([t[0] for t in targets])


def randomized(backbone, prior: str, seed: int = 0) -> LatentLM:
    """A tiny latent whose heads and projection are random, so z moves the logits."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = LatentModel(backbone, d_z=4, prior=prior, hidden=16).eval()
        with torch.no_grad():
            for head in (module.latent.posterior_head, module.latent.prior_head):
                if head is not None:
                    head.net[-1].weight.normal_(0.0, 0.3)
                    head.net[-1].bias[:4].normal_(0.0, 0.5)
            module.latent.proj.weight.normal_(0.0, 2.0)
    return module


def mean_by_hand(module, enc) -> torch.Tensor:
    """z at its mean from a plain forward's layer-k state: q(z|prompt)'s loc (standard), else the prior network's."""
    with torch.no_grad():
        h = module.backbone.model(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
            output_hidden_states=True,
        ).hidden_states[module.layer]
        h_scored = h[torch.arange(h.shape[0]), enc.scored]
        head = module.latent.posterior_head if module.latent.prior == "standard" else module.latent.prior_head
        return head(h_scored)[0]


def read_adapter(module, enc) -> torch.Tensor:
    forward = run_forward(module.backbone.model, enc, hidden_states=True, cache=True)
    return adapter.FAMILY.read(forward, context_for(module.backbone.model, module=module, n=len(PROMPTS)))["adapter_nll"]


@pytest.mark.parametrize("prior", ["standard", "conditional", "deterministic"])
def test_adapter_nll_is_minus_log_p_of_y_with_z_at_its_mean(tiny_gpt2, prior):
    module = randomized(tiny_gpt2, prior)
    enc, y = own_tokens(tiny_gpt2)
    got = read_adapter(module, enc)
    logp = torch.log_softmax(logits_with_z(module, enc, mean_by_hand(module, enc)), -1)
    expected = -logp[torch.arange(len(PROMPTS)), y]
    # float32 forwards of a 4-block, d=64 model along two code paths (cached prefix vs full
    # sequence): they differ by summation order only, about 1e-6 on logits of order 1-10
    assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # z matters here: the base model's own −log p(ŷ) is not what the adapter gives
    base = -torch.log_softmax(logits_with_z(module, enc, torch.zeros(len(PROMPTS), 4)), -1)[torch.arange(len(PROMPTS)), y]
    assert (got - base).abs().max() > 1e-2


def test_the_twin_has_no_posterior_and_refuses_every_estimator_of_a_spread(tiny_gpt2):
    twin = LatentModel(tiny_gpt2, d_z=4, prior="deterministic", hidden=16)
    assert twin.latent.posterior_head is None and twin.latent.prior_head is not None
    assert not [k for k in twin.state_dict() if "posterior_head" in k]
    with pytest.raises(ValueError, match="no posterior"):
        twin.latent.posterior(torch.zeros(1, 64))
    for name in ("posterior_var", "latent_mi", "latent_nll", "latent_kl"):
        assert "deterministic twin" in (why_not(name, twin) or ""), name
    assert why_not("adapter_nll", twin) is None
    assert why_not("adapter_nll", "conditional") is None and why_not("adapter_nll", None) is not None


def _steps(module, batch, n: int) -> list[float]:
    """n AdamW steps of the module's own training loss on one batch; the loss before each."""
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda *args, **kwargs: None
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(n):
        optimizer.zero_grad()
        loss = module._shared_step(batch, "train")
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def test_the_twin_trains_by_maximum_likelihood_of_the_target(tiny_gpt2):
    batch = {"prompt": PROMPTS, "target": ["cake", "stone", "end"]}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        twin = LatentLM(tiny_gpt2, d_z=4, prior="deterministic", hidden=16, lr=0.01, cache_frozen=False)
    # before any step z = 0 and proj = 0: the loss is the base model's own NLL of the targets, summed over tokens
    enc = encode(tiny_gpt2.tokenizer, PROMPTS, twin.model.target_ids(batch["target"]), "cpu")
    with torch.no_grad():
        logits = twin.model.decode(twin.model.lower(enc), torch.zeros(3, 4), enc)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, enc.targets.unsqueeze(-1)).squeeze(-1)
    base_nll = -(logp * enc.target_mask).sum(-1).mean()
    frozen = copy.deepcopy(tiny_gpt2.model.state_dict())
    losses = _steps(twin, batch, 30)
    assert losses[0] == pytest.approx(float(base_nll), rel=1e-5)
    # it learns the three targets (a zero loc layer with the zero projection never moved: 10.76 nats at every step)
    assert losses[-1] < losses[0] - 1.0
    assert all(torch.equal(v, tiny_gpt2.model.state_dict()[k]) for k, v in frozen.items())  # the backbone did not move
    assert twin.stats["train_latent"].kl_sum.abs().sum() == 0  # no KL term: nothing to log but zeros
