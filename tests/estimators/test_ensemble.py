"""The ensemble family: its statistics against a float64 computation by hand, its read against
member forwards computed by hand, and a constructed case where the members' spread must rise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_adapter import PROMPTS, logits_with_z, mean_by_hand, own_tokens, randomized
from torch.testing import assert_close

from vtrans.estimators import ensemble
from vtrans.estimators.base import context_for, run_forward
from vtrans.estimators.registry import why_not


def stats_by_hand(logits: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The three scores from (B, M, V) logits, written out in numpy float64."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # (B, M, V)
    mean = p.mean(1)  # (B, V)
    rows = np.arange(len(y))
    log_py = np.log(p[rows, :, y])  # (B, M)
    entropy = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    return {
        "ensemble_nll": -np.log(mean[rows, y]),
        "ensemble_var": log_py.var(1),
        "ensemble_mi": entropy(mean) - entropy(p).mean(1),
    }


def test_ensemble_stats_equal_a_float64_computation_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 11, generator=gen) * 2.0
    y = torch.tensor([0, 3, 10, 5, 5])
    got = ensemble.ensemble_stats(logits, y)
    expected = stats_by_hand(logits.double().numpy(), y.numpy())
    for name, value in expected.items():
        # float64 inside, float32 out: one float32 rounding of values of order 0.01 to 10
        assert_close(got[name], torch.from_numpy(value).float(), rtol=1e-6, atol=1e-7), name


def test_identical_members_have_no_spread():
    logits = torch.randn(3, 1, 9).expand(3, 5, 9)
    y = torch.tensor([1, 2, 3])
    got = ensemble.ensemble_stats(logits, y)
    # log p̄ = logsumexp − log M of M equal values is exact to a float64 ulp or two, so the
    # KLs are 0 to about 1e-16; the variance of equal numbers is exactly 0
    assert torch.equal(got["ensemble_var"], torch.zeros(3))
    assert_close(got["ensemble_mi"], torch.zeros(3), rtol=0, atol=1e-12)
    assert_close(got["ensemble_nll"], -torch.log_softmax(logits[:, 0].double(), -1)[torch.arange(3), y].float())


def read(members, enc) -> dict[str, torch.Tensor]:
    model = members[0].backbone.model
    forward = run_forward(model, enc, hidden_states=True, cache=True)
    return ensemble.FAMILY.read(forward, context_for(model, module=members[0], n=len(PROMPTS), members=members))


def test_the_read_equals_each_members_forward_by_hand(tiny_gpt2):
    members = [randomized(tiny_gpt2, "conditional", seed) for seed in range(3)]
    enc, y = own_tokens(tiny_gpt2)
    got = read(members, enc)
    logits = torch.stack([logits_with_z(m, enc, mean_by_hand(m, enc)) for m in members], 1)  # (B, M, V)
    expected = stats_by_hand(logits.double().numpy(), y.numpy())
    # two float32 code paths through the model (see test_adapter), then float64 statistics:
    # logits agree to about 1e-6, and each score moves by at most a few times that
    for name, value in expected.items():
        assert_close(got[name], torch.from_numpy(value).float(), rtol=1e-4, atol=1e-4), name
    assert (got["ensemble_mi"] > 1e-3).all()


def test_the_spread_rises_with_the_members_disagreement(tiny_gpt2):
    """Two members that differ only in the projection of z, by t·Δ: at t = 0 there is no spread,
    and both spreads grow with t."""
    enc, _ = own_tokens(tiny_gpt2)
    base = randomized(tiny_gpt2, "deterministic", 0)
    delta = torch.randn(base.latent.proj.weight.shape, generator=torch.Generator().manual_seed(5))
    spreads = []
    for t in (0.0, 0.5, 1.0, 2.0):
        other = randomized(tiny_gpt2, "deterministic", 0)
        with torch.no_grad():
            other.latent.proj.weight.add_(t * delta)
        got = read([base, other], enc)
        spreads.append((got["ensemble_var"], got["ensemble_mi"]))
    # at t = 0 the members are the same model: the same float32 logits, so no spread beyond
    # the float64 ulps of log p̄ (see test_identical_members_have_no_spread)
    assert torch.equal(spreads[0][0], torch.zeros(3))
    assert_close(spreads[0][1], torch.zeros(3), rtol=0, atol=1e-12)
    for (var_a, mi_a), (var_b, mi_b) in zip(spreads[1:], spreads[2:], strict=False):
        assert (mi_b > mi_a).all() and (var_b.mean() > var_a.mean())


def test_one_latent_is_no_ensemble():
    assert "ensemble" in why_not("ensemble_mi", "conditional", members=1)
    assert why_not("ensemble_mi", "conditional", members=2) is None
    assert why_not("ensemble_mi", None, members=2) is not None  # needs latents


@pytest.mark.parametrize("prior", ["conditional", "deterministic"])
def test_an_ensemble_of_one_latent_twice_reads_as_that_latent(tiny_gpt2, prior):
    module = randomized(tiny_gpt2, prior, 1)
    enc, _ = own_tokens(tiny_gpt2)
    from vtrans.estimators import adapter

    forward = run_forward(tiny_gpt2.model, enc, hidden_states=True, cache=True)
    alone = adapter.FAMILY.read(forward, context_for(tiny_gpt2.model, module=module, n=len(PROMPTS)))["adapter_nll"]
    assert_close(read([module, module], enc)["ensemble_nll"], alone, rtol=1e-6, atol=1e-6)
