"""The latent's whole-answer scores (``latent_answer``), each against a forward computed by hand:
the model itself with proj(z) added after block k from the scored position on, every answer
token teacher-forced."""

from __future__ import annotations

import math

import pytest
import torch
from test_adapter import randomized
from torch.testing import assert_close

from vtrans.backbone import architectures
from vtrans.backbone.tokens import encode
from vtrans.config import EstimatorConfig
from vtrans.estimators import adapter, latent, latent_answer
from vtrans.estimators.base import context_for, run_forward
from vtrans.estimators.latent import inference_distribution, item_noise

PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: kill two birds with one", "Complete the idiom: the"]
SAMPLES = 6


def answer_logp_by_hand(module, enc, z: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_t log p(y_t | prompt, y_<t, z) in float64, item by item and token by token, from a
    plain forward of the model with proj(z) added to the stream after block k at the scored
    position and every later one (a hook on the model: not the estimator's path)."""
    model = module.backbone.model
    total = []
    for b in range(enc.input_ids.shape[0]):
        delta = module.latent.proj(z[b : b + 1])  # (1, C)
        where = enc.after_scored[b : b + 1].unsqueeze(-1).float()

        def add_z(mod, args, output, delta=delta, where=where):
            if isinstance(output, tuple):
                return (output[0] + where * delta.unsqueeze(1), *output[1:])
            return output + where * delta.unsqueeze(1)

        handle = architectures.blocks(model)[module.layer - 1].register_forward_hook(add_z)
        try:
            with torch.no_grad():
                logits = model(**{k: v[b : b + 1] for k, v in enc.inputs.items()}).logits[0].double()
        finally:
            handle.remove()
        logp, n = 0.0, enc.targets.shape[1]
        for j in range(n):
            if enc.target_mask[b, j]:
                position = enc.input_ids.shape[1] - 1 - n + j  # the position that predicts slot j
                logp += float(torch.log_softmax(logits[position], -1)[enc.targets[b, j]])
        total.append(logp)
    return torch.tensor(total, dtype=torch.float64)


def answers(backbone, tokens: int):
    """The prompts followed by fixed answers: the first ``tokens`` tokens of each text (the second
    item's one token only, so that the answers differ in length). The scores' arithmetic does not
    ask whose answer it is."""
    texts = [" blue moon rises tonight", " stone and a bird", " end of the road"]
    ids = [backbone.tokenizer(t, add_special_tokens=False)["input_ids"][:tokens] for t in texts]
    ids[1] = ids[1][:1]
    return encode(backbone.tokenizer, PROMPTS, ids, "cpu")


def read(module, enc, samples: int = SAMPLES):
    forward = run_forward(module.backbone.model, enc, hidden_states=True, cache=True)
    config = EstimatorConfig(samples=samples)
    context = context_for(module.backbone.model, config, module=module, n=len(PROMPTS))
    return forward, context, latent_answer.FAMILY.read(forward, context)


@pytest.mark.parametrize("prior", ["standard", "conditional"])
def test_the_whole_answer_scores_equal_a_token_by_token_forward(tiny_gpt2, prior):
    module = randomized(tiny_gpt2, prior)
    enc = answers(tiny_gpt2, 3)
    assert enc.target_mask.sum(1).tolist() == [3, 1, 3]
    forward, context, got = read(module, enc)
    h = latent.layer_state(forward, module)
    mean = module.latent.mean(module.states(h, enc)[0])
    # float32 forwards along two code paths (cached prefix vs the whole sequence) differ by
    # summation order, about 1e-6 a logit; summed over 3 tokens that stays far below 1e-4
    assert_close(got["adapter_answer_nll"].double(), -answer_logp_by_hand(module, enc, mean), rtol=1e-4, atol=1e-4)
    loc, scale = inference_distribution(module, h, enc)
    eps = item_noise(list(range(len(PROMPTS))), SAMPLES, loc.shape[1], 0)
    per_sample = torch.stack([-answer_logp_by_hand(module, enc, loc + scale * eps[:, s]) for s in range(SAMPLES)], 1)
    nll = -(torch.logsumexp(-per_sample, 1) - math.log(SAMPLES))
    assert_close(got["latent_answer_nll"].double(), nll, rtol=1e-4, atol=1e-4)
    assert_close(got["latent_answer_gap"].double(), (per_sample.mean(1) - nll).clamp(min=0), rtol=1e-4, atol=1e-4)
    assert (got["latent_answer_gap"] >= 0).all() and got["latent_answer_gap"].max() > 1e-3  # z's spread moves it here
    # the answer's later tokens count: the whole answer is less likely than its first token alone
    first = adapter.FAMILY.read(forward, context)["adapter_nll"]
    assert (got["adapter_answer_nll"][[0, 2]] > first[[0, 2]]).all()


def test_with_one_answer_token_they_are_the_first_token_scores(tiny_gpt2):
    module = randomized(tiny_gpt2, "conditional")
    enc = answers(tiny_gpt2, 1)
    forward, context, got = read(module, enc, samples=8)
    first = {**adapter.FAMILY.read(forward, context), **latent.SAMPLES.read(forward, context)}
    # the same z draws (item-seeded) through two code paths: the cached-prefix decode and the
    # scored position's own pass; float32 summation order alone separates them
    assert_close(got["adapter_answer_nll"], first["adapter_nll"], rtol=1e-4, atol=1e-4)
    assert_close(got["latent_answer_nll"], first["latent_nll"], rtol=1e-4, atol=1e-4)


def test_the_twin_gives_the_mean_only(tiny_gpt2):
    twin = randomized(tiny_gpt2, "deterministic")
    _, _, got = read(twin, answers(tiny_gpt2, 2))
    assert set(got) == {"adapter_answer_nll"}
    from vtrans.estimators.registry import why_not

    assert why_not("latent_answer_nll", twin) is not None and why_not("adapter_answer_nll", twin) is None
