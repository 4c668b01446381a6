"""MC dropout of the whole answer (``mc_dropout_answer``): against the same masks applied by hand,
its limits (no dropout: the plain answer's surprise), and that the model is restored."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vtrans.backbone.tokens import encode
from vtrans.config import EstimatorConfig
from vtrans.estimators import mc_dropout_answer, sequence
from vtrans.estimators.base import context_for, run_forward
from vtrans.estimators.mc_dropout import mc_dropout

PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: kill two birds with one", "Complete the idiom: the"]
TEXTS = [" cake and ale", " stone", " end of it"]


def batch(backbone):
    ids = [backbone.tokenizer(t, add_special_tokens=False)["input_ids"][:3] for t in TEXTS]
    return encode(backbone.tokenizer, PROMPTS, ids, "cpu")


def read(backbone, enc, passes: int, p: float, seed: int = 0):
    forward = run_forward(backbone.model, enc, hidden_states=True)
    config = EstimatorConfig(passes=passes, dropout=p, seed=seed)
    return forward, mc_dropout_answer.FAMILY.read(forward, context_for(backbone.model, config, n=len(PROMPTS)))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_the_scores_are_the_masks_predictive_of_the_whole_answer(name, request):
    backbone = request.getfixturevalue(name.replace("-", "_"))
    enc, passes, p = batch(backbone), 4, 0.3
    _, got = read(backbone, enc, passes, p, seed=5)
    # by hand: the same seed, the batch repeated T times in one forward with dropout on, each
    # row's answer log-probability summed token by token in float64
    from vtrans.estimators.base import item_seed

    rep = enc.repeat(passes)
    with torch.random.fork_rng():
        torch.manual_seed(item_seed(5, 0))
        with mc_dropout(backbone.model, p), torch.no_grad():
            logits = backbone.model(**rep.inputs).logits.double()
    n, width = rep.targets.shape[1], rep.input_ids.shape[1]
    per_mask = torch.zeros(len(PROMPTS), passes, dtype=torch.float64)
    for row in range(rep.input_ids.shape[0]):
        for j in range(n):
            if rep.target_mask[row, j]:
                per_mask[row // passes, row % passes] -= torch.log_softmax(logits[row, width - 1 - n + j], -1)[rep.targets[row, j]]
    nll = -(torch.logsumexp(-per_mask, 1) - math.log(passes))
    # float32 forwards against a float64 reduction of the same float32 logits: below 1e-4
    assert_close(got["mc_dropout_answer_nll"].double(), nll, rtol=1e-4, atol=1e-4)
    assert_close(got["mc_dropout_answer_gap"].double(), (per_mask.mean(1) - nll).clamp(min=0), rtol=1e-4, atol=1e-4)
    assert (got["mc_dropout_answer_gap"] > 1e-3).all()  # the masks move every answer here


def test_without_dropout_it_is_the_answers_own_surprise_and_the_model_is_restored(tiny_llama):
    enc = batch(tiny_llama)
    with torch.no_grad():
        before = tiny_llama.model(**enc.inputs).logits
    forward, got = read(tiny_llama, enc, passes=3, p=0.0)
    plain = sequence.from_forward(forward)["sequence_nll"]
    # every mask keeps everything: the same forward three times, float32 rounding apart
    assert_close(got["mc_dropout_answer_nll"], plain, rtol=1e-5, atol=1e-5)
    assert_close(got["mc_dropout_answer_gap"], torch.zeros(len(PROMPTS)), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(tiny_llama.model(**enc.inputs).logits, before)  # hooks gone, dropout off
