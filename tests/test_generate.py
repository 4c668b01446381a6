"""Completions (vtrans.generate): the labels every estimator is judged on."""

from __future__ import annotations

import pytest
import torch

from vtrans.generate import Completion, complete, is_correct, word_token_count
from vtrans.loading import Backbone

PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: kill two birds with one", "Complete the idiom: break the"]


@pytest.fixture(scope="module")
def gpt2() -> Backbone:
    backbone = Backbone("tiny-gpt2")
    assert backbone.model.config.n_layer == 4  # the tiny config, not a full GPT-2
    return backbone


def test_greedy_is_deterministic_and_starts_with_the_argmax(gpt2):
    first = complete(gpt2.model, gpt2.tokenizer, PROMPTS, max_new_tokens=4)
    again = complete(gpt2.model, gpt2.tokenizer, PROMPTS, max_new_tokens=4, batch_size=1)  # other padding
    assert first == again
    for prompt, completion in zip(PROMPTS, first, strict=True):
        ids = gpt2.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            argmax = int(gpt2.model(input_ids=ids).logits[0, -1].argmax())
        assert completion.first_token == argmax
        assert completion.word_ids[0] == argmax
        assert completion.text == gpt2.tokenizer.decode(
            gpt2.tokenizer(completion.text, add_special_tokens=False)["input_ids"]
        )


def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone(gpt2):
    state = torch.random.get_rng_state()
    a = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, temperature=1.0, seed=7)
    c = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, temperature=1.0, seed=8)
    assert a == b
    # a random tiny model is close to uniform over 50k tokens: another seed gives other tokens
    assert [x.first_token for x in a] != [x.first_token for x in c]


def test_word_token_count_on_a_multi_token_word(gpt2):
    tok = gpt2.tokenizer
    word_ids = tok(" unbelievableness", add_special_tokens=False)["input_ids"]
    assert len(word_ids) >= 3  # really several tokens
    ids = word_ids + tok(". And then", add_special_tokens=False)["input_ids"]
    assert word_token_count(tok, ids, "unbelievableness") == len(word_ids)
    # a prefix of the word that is itself a word does not stop the count early
    cakes = tok(" cakes!", add_special_tokens=False)["input_ids"]
    assert word_token_count(tok, cakes, "cakes") == len(tok(" cakes", add_special_tokens=False)["input_ids"])
    assert word_token_count(tok, ids, "") == 1


def test_multi_token_completion_keeps_the_whole_word(gpt2):
    for completion in complete(gpt2.model, gpt2.tokenizer, PROMPTS, max_new_tokens=6):
        if not completion.word:
            continue
        decoded = gpt2.tokenizer.decode(list(completion.word_ids))
        assert completion.word in decoded.lower()
        shorter = gpt2.tokenizer.decode(list(completion.word_ids[:-1]))
        assert completion.word not in shorter.lower().split()


@pytest.mark.parametrize(
    ("text", "target", "expected"),
    [
        (" Cake.", "cake", True),
        (" cake", "Cake.", True),
        ("\n  CAKE and more", "cake", True),
        (" Don’t stop", "don't", True),  # curly apostrophe
        (" cakes", "cake", False),
        (" cake", "cakes", False),
        (" ...", "cake", False),  # no word at all
        ("", "cake", False),
    ],
)
def test_is_correct_normalises_both_sides(text, target, expected):
    from vtrans.data import first_word

    completion = Completion(text=text, word=first_word(text), first_token=0, word_ids=(0,))
    assert is_correct(completion, target) is expected
