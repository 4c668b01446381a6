"""``head_predictive_stats``: the predictive statistics of a linear head, a vocabulary block at a time."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vtrans.backbone.architectures import softcap
from vtrans.estimators.common import head_predictive_stats, predictive_stats


def reference(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics from the whole (B, S, V) logits, by a float64 ``log_softmax``."""
    logp = torch.log_softmax(logits.double(), -1)  # (B, S, V)
    probs = logp.exp()
    mean = probs.mean(1)  # (B, V)
    log_mean = mean.log()
    logp_y = logp[torch.arange(len(y)), :, y]  # (B, S)
    return {
        "var": logp_y.exp().var(1, unbiased=False),
        "log_var": logp_y.var(1, unbiased=False),
        "entropy": -(mean * log_mean).sum(-1),
        "mi": (probs * (logp - log_mean.unsqueeze(1))).sum(-1).mean(1),
        "nll": math.log(logits.shape[1]) - torch.logsumexp(logp_y, 1),
    }


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("per_block", [1, 1 << 20])  # blocks of 512 columns (the last one ragged); one block
def test_head_predictive_stats_equal_the_materialised_float64_statistics(cap, per_block):
    # The logits below are float32, as the model's; the blockwise products may round them
    # differently from the one product of the reference (another kernel, another summation order
    # on another CPU or thread count), by at most a few float32 ulps of |l| < 16, i.e. ε < 1e-5.
    # Every statistic moves by at most a small multiple of ε under such a change (log p_s by 2ε,
    # KL(p_s ‖ p̄) by at most 4ε, p̄ being a stationary point of Σ_s KL(p_s ‖ q)), so atol 5e-5
    # holds on any CPU; the float64 arithmetic itself agrees to ~1e-12.
    gen = torch.Generator().manual_seed(0)
    batch, samples, width, vocab = 5, 4, 16, 1300
    h = torch.randn(batch, 1, width, generator=gen) + 0.3 * torch.randn(batch, samples, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.6
    bias = torch.randn(vocab, generator=gen) * 0.5
    y = torch.randint(0, vocab, (batch,), generator=gen)
    logits = softcap(F.linear(h, weight, bias), cap)  # (B, S, V)

    got = head_predictive_stats(h, weight, bias, y, cap, logits_per_block=per_block)
    expected = reference(logits, y)
    current = predictive_stats(logits, y)
    assert got.keys() == current.keys() == expected.keys()
    assert (expected["mi"] > 1e-2).all()  # a spread over samples that the test can see
    for name, value in expected.items():
        assert got[name].dtype == torch.float32
        assert_close(got[name], value.float(), rtol=1e-5, atol=5e-5)
        assert_close(got[name], current[name], rtol=1e-5, atol=5e-5)
