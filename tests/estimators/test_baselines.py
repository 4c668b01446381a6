"""The baselines (``vtrans.estimators.baselines``): ``msp`` keeps ranking where p(ŷ) rounds to 1 in
float32, on cases constructed to fail without it."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from vtrans.backbone.tokens import Encoded
from vtrans.estimators import baselines

# --------------------------------------------------------------------------- 4. msp in float32


def _encoded_first_tokens(targets: torch.Tensor) -> Encoded:
    """A batch of one-token targets (the ids and masks are never read by ``from_logits``)."""
    n = targets.shape[0]
    ones = torch.ones((n, 1), dtype=torch.long)
    return Encoded(ones, ones, ones * 0, torch.zeros(n, dtype=torch.long), targets.view(n, 1), ones.bool())


def test_msp_tells_apart_probabilities_that_round_to_one():
    vocab = 50
    logits = torch.zeros(2, 1, vocab)
    for i, rest in enumerate((1e-9, 1e-8)):  # p(ŷ) = 1 − rest, ŷ = token 0
        logits[i, 0, 1:] = math.log(rest / (vocab - 1))
    logits += 7.0  # a logit scale where float32 cannot hold 1 − p near 1 either
    msp = baselines.from_logits(logits, _encoded_first_tokens(torch.zeros(2, dtype=torch.long)))["msp"]
    assert msp[0] < msp[1]
    assert_close(msp, torch.tensor([1e-9, 1e-8]), rtol=1e-4, atol=0)


def test_msp_ranks_exactly_as_minus_log_p():
    gen = torch.Generator().manual_seed(0)
    n, vocab = 64, 300
    logits = torch.randn((n, 1, vocab), generator=gen) * 3
    y = logits.argmax(-1).view(n)  # greedy ŷ, then raised above the rest by 0..30 nats: 1 − p from ~1 to ~1e-13
    logits[torch.arange(n), 0, y] += 30 * torch.rand(n, generator=gen)
    msp = baselines.from_logits(logits, _encoded_first_tokens(y))["msp"]
    # the reference in float64, from the odds of the other tokens r = (1 − p) / p: −log p = log1p(r)
    x = logits.double().view(n, vocab)
    others = torch.ones_like(x, dtype=torch.bool).scatter(1, y.unsqueeze(1), False)
    ratio = ((x - x[torch.arange(n), y].unsqueeze(1)).exp() * others).sum(1)
    nll = torch.log1p(ratio)
    assert (torch.softmax(logits, -1)[torch.arange(n), 0, y] == 1).sum() >= 10  # p rounds to 1 in float32
    assert torch.equal(msp.argsort(), nll.argsort())
    assert_close(msp.double(), ratio / (1 + ratio), rtol=1e-4, atol=0)  # still 1 − p in value
