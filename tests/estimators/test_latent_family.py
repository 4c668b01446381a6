"""The latent family (``vtrans.estimators.latent``), two behaviours, each
against a case constructed to fail without it.

1. ``latent_mi`` draws each item's z noise from its own seed: fresh from item to item, reproducibly,
   whatever the batch size.
2. ``latent_kl`` reads q(z|prompt, target) at the last token of the whole completion word, as in training.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vtrans.backbone.generate import Completion
from vtrans.backbone.tokens import encode
from vtrans.config import EstimatorConfig
from vtrans.data import DEFAULT_TEMPLATE, IdiomItem
from vtrans.estimators.runner import Runner
from vtrans.evaluation.scored import score_items
from vtrans.latent.gaussian import kl_normal
from vtrans.scoring.scorer import Scorer

PROMPT = "Complete the idiom: the early bird catches the"
ITEM = IdiomItem(idiom="the early bird catches the worm", prefix="the early bird catches the", target="worm")


def _runner(module, **config) -> Runner:
    return Runner(module.backbone, module, EstimatorConfig(**config), progress=False)


# --------------------------------------------------------------------------- 1. latent_mi noise


def test_latent_mi_draws_fresh_noise_for_each_item(random_latent):
    """Two identical items: the same noise for both would give equal latent_mi."""
    runner = _runner(random_latent, batch_size=1, samples=4)
    _, scores = runner.score_prompts([PROMPT, PROMPT], ["latent_mi"])
    mi = scores["latent_mi"]
    assert (mi > 1e-6).all()  # z moves the prediction: the values say something about the noise
    assert not torch.isclose(mi[0], mi[1], rtol=1e-4, atol=0)
    _, again = runner.score_prompts([PROMPT, PROMPT], ["latent_mi"])
    assert torch.equal(again["latent_mi"], mi)  # the run is reproducible for a fixed seed
    _, other_seed = _runner(random_latent, batch_size=1, samples=4, seed=1).score_prompts([PROMPT, PROMPT], ["latent_mi"])
    assert not torch.equal(other_seed["latent_mi"], mi)
    _, together = _runner(random_latent, batch_size=2, samples=4).score_prompts([PROMPT, PROMPT], ["latent_mi"])
    # an item's draws do not depend on its batch; what may differ is the float32 rounding of its
    # logits in a batch of another shape (~1e-6 on logits of order 1 here), which moves latent_mi by
    # at most max|Δlogit| · E|log p_s/p̄| (about 0.1 at an MI of 3e-3): an absolute 1e-6, whatever
    # the CPU (the statistic itself is exact to ~1e-15, see predictive_stats)
    assert_close(together["latent_mi"], mi, rtol=0, atol=1e-6)
    _, later = runner.score_prompts([PROMPT], ["latent_mi"], start=1)
    assert torch.equal(later["latent_mi"], mi[1:])  # a run scored in pieces draws as one call


def test_evaluate_draws_fresh_noise_for_each_item(random_latent):
    runner = _runner(random_latent, batch_size=1, samples=4)
    first = score_items(runner, [ITEM, ITEM], ["latent_mi"], DEFAULT_TEMPLATE, gold=False).scores["latent_mi"]
    assert not torch.isclose(first[0], first[1], rtol=1e-4, atol=0)
    again = score_items(runner, [ITEM, ITEM], ["latent_mi"], DEFAULT_TEMPLATE, gold=False).scores["latent_mi"]
    assert torch.equal(again, first)


def test_scorer_draws_fresh_noise_across_its_batches(random_latent):
    """``vtrans score`` runs the runner once per batch: items go on being numbered from batch to batch."""
    scorer = Scorer(random_latent, estimators=["latent_mi"], batch_size=1, samples=4, quiet=True)
    a, b = (r["scores"]["latent_mi"] for r in scorer.score([PROMPT, PROMPT]))
    assert abs(a - b) > 1e-4  # fresh noise for each item: far apart beside the 1e-6 below
    assert [r["scores"]["latent_mi"] for r in scorer.score([PROMPT, PROMPT])] == [a, b]
    together = Scorer(random_latent, estimators=["latent_mi"], batch_size=2, samples=4, quiet=True)
    # the same draws in a batch of two: only the logits' float32 rounding differs (see the test above)
    assert [r["scores"]["latent_mi"] for r in together.score([PROMPT, PROMPT])] == pytest.approx([a, b], rel=0, abs=1e-6)


def test_standalone_latent_scores_seed_each_item(random_latent):
    from vtrans.estimators import latent as latent_estimators

    enc = encode(random_latent.backbone.tokenizer, [PROMPT], [[262]])
    one = latent_estimators.scores(random_latent, enc, samples=4, seed=3)["latent_mi"]
    assert torch.equal(latent_estimators.scores(random_latent, enc, samples=4, seed=3)["latent_mi"], one)
    other = latent_estimators.scores(random_latent, enc, samples=4, seed=3, indices=[1])["latent_mi"]
    assert not torch.equal(other, one)  # another item index: other draws


# --------------------------------------------------------------------------- 2. latent_kl reads the whole word


def _multi_token_completion(tokenizer) -> Completion:
    ids = tokenizer(" flabbergastingly", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2, "the test needs a completion word of several tokens"
    return Completion(" flabbergastingly", "flabbergastingly", ids[0], tuple(ids))


def _kl_by_hand(module, targets: list[int], prompt: str = PROMPT) -> torch.Tensor:
    enc = encode(module.backbone.tokenizer, [prompt], [targets])
    with torch.no_grad():
        q_loc, q_scale, p_loc, p_scale = module.distributions(module.lower(enc), enc)
    return kl_normal(q_loc, q_scale, p_loc, p_scale).sum(-1)


@pytest.mark.parametrize("path", ["score", "scores"])
def test_latent_kl_reads_the_last_token_of_the_whole_word(random_latent, path, monkeypatch):
    completion = _multi_token_completion(random_latent.backbone.tokenizer)
    runner = _runner(random_latent, batch_size=2, samples=2)
    monkeypatch.setattr(runner, "complete", lambda prompts, start=0: [completion] * len(prompts))
    if path == "score":
        got = score_items(runner, [ITEM], ["latent_kl"], DEFAULT_TEMPLATE, gold=False).scores["latent_kl"]
    else:
        got = runner.scores([PROMPT], [completion], ["latent_kl"])["latent_kl"]
    whole, first = _kl_by_hand(random_latent, list(completion.word_ids)), _kl_by_hand(random_latent, [completion.first_token])
    assert not torch.isclose(whole, first, rtol=1e-3).any()  # the two readings differ here
    assert_close(got, whole, rtol=1e-4, atol=1e-5)


def test_latent_kl_of_bare_prompts_reads_the_whole_generated_word(random_latent):
    """``score_prompts`` takes the states from ``generate`` itself: the word it generated, whole."""
    prompt = "spill the"  # the tiny GPT-2 writes a word of 3 tokens here
    completions, got = _runner(random_latent, max_new_tokens=4).score_prompts([prompt], ["latent_kl"])
    word = list(completions[0].word_ids)
    assert len(word) >= 2
    whole, first = _kl_by_hand(random_latent, word, prompt), _kl_by_hand(random_latent, word[:1], prompt)
    assert not torch.isclose(whole, first, rtol=1e-3).any()
    assert_close(got["latent_kl"], whole, rtol=1e-4, atol=1e-5)


def test_prompt_only_latent_scores_do_not_change_with_the_whole_word(random_latent):
    """posterior_var and latent_mi read the scored position: causal attention keeps them as they were."""
    from vtrans.estimators import latent as latent_estimators

    completion = _multi_token_completion(random_latent.backbone.tokenizer)
    runner = _runner(random_latent, batch_size=2, samples=3)
    got = runner.scores([PROMPT], [completion], ["posterior_var", "latent_mi", "latent_kl"])  # the whole word encoded
    first = encode(random_latent.backbone.tokenizer, [PROMPT], [[completion.first_token]])
    expected = latent_estimators.scores(random_latent, first, samples=3, seed=0)
    for name in ("posterior_var", "latent_mi"):
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
