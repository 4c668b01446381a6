"""Answers of several words (``answer_words`` K): items, the answer of a completion, its label, folds."""

from __future__ import annotations

import pytest

from vtrans.backbone.generate import Completion, is_correct
from vtrans.data import (
    DataError,
    first_word,
    first_words,
    load_idioms,
    split_idiom,
    with_answer_words,
    word_is_final,
    words_final,
)
from vtrans.evaluation.folds import FoldPlan


def test_an_answer_of_k_words_is_the_idioms_last_k():
    item = split_idiom("The early bird catches the worm.", 3)
    assert (item.prefix, item.target) == ("The early bird", "catches the worm")
    item = split_idiom("once in a blue moon", 2)
    assert (item.prefix, item.target) == ("once in a", "blue moon")
    assert split_idiom("once in a blue moon", 1) == split_idiom("once in a blue moon")


def test_idioms_too_short_for_k_words_are_left_out_and_counted():
    items = [split_idiom(s) for s in ("once in a blue moon", "kick the bucket", "break even", "a state of well-being")]
    kept, short = with_answer_words(items, 2)
    # "kick the bucket" keeps one prompt word; "break even" none; "of well-being" is three compared words
    assert [it.target for it in kept] == ["blue moon"]
    assert short == 3
    with pytest.raises(DataError, match="too few for an answer of 2 words"):
        split_idiom("kick the bucket", 2)
    with pytest.raises(DataError, match="a hyphen splits a word"):
        split_idiom("a state of well-being", 2)


def test_one_word_answers_are_todays_items_unchanged():
    items = load_idioms("builtin")
    kept, short = with_answer_words(items, 1)
    assert kept is items and short == 0  # K = 1: the very items, a one-word prompt kept as before


def test_the_first_k_words_of_a_completion_by_hand():
    text = " Blue moon.\nAnd then"
    assert first_words(text, 1) == first_word(text) == "blue"
    assert first_words(text, 2) == "blue moon"
    assert first_words(text, 3) == "blue moon and"
    assert first_words(" blue", 2) == "blue"  # fewer words than K: what there is
    assert first_words(" - ... ", 2) == ""
    assert first_words(" it's a dog's life", 3) == "it's a dog's"


def test_an_answer_is_final_once_its_kth_word_is_followed_by_a_non_word():
    assert words_final(" blue moon.", 2) and not words_final(" blue moon", 2)
    assert words_final(" blue ", 1) and not words_final(" blue ", 2)
    assert not words_final(" blue moo\ufffd", 2)  # a character still being decoded
    for text in (" cake.", " cake", "", " cake \ufffd", " 'tis", "cake. '\ufffd"):
        assert words_final(text, 1) == word_is_final(text)


@pytest.mark.parametrize(
    ("text", "target", "k", "correct"),
    [
        (" blue moon. Then", "blue moon", 2, True),
        (" Blue Moon", "blue moon", 2, True),  # normalised as one word is
        (" blue sky", "blue moon", 2, False),
        (" blue", "blue moon", 2, False),  # stopped before the second word
        (" blue moon", "moon", 1, False),
        (" catches the worm!", "catches the worm", 3, True),
        (" catches a worm", "catches the worm", 3, False),
        ("", "blue moon", 2, False),
    ],
)
def test_labels_of_two_and_three_word_answers_by_hand(text, target, k, correct):
    completion = Completion(text, first_words(text, k), 0, (0,))
    assert is_correct(completion, target, k) is correct


def test_an_idiom_is_in_the_same_fold_at_every_k():
    plans = {k: FoldPlan.load("builtin", 5, fold_seed=0, answer_words=k) for k in (1, 2, 3)}
    fold_at_1 = {it.idiom: f for it, f in zip(plans[1].items, plans[1].folds, strict=True)}
    for k in (2, 3):
        plan = plans[k]
        assert plan.answer_words == k and plan.n_short == len(plans[1].items) - len(plan.items) > 0
        assert all(fold_at_1[it.idiom] == f for it, f in zip(plan.items, plan.folds, strict=True))
        assert all(len(it.target.split()) == k and len(it.prefix.split()) >= 2 for it in plan.items)
    assert plans[2].digest() != plans[1].digest()  # other targets: another run's units


def test_the_datamodule_trains_on_answers_of_k_words_and_records_k():
    from vtrans.latent.datamodule import IdiomDataModule

    dm = IdiomDataModule(answer_words=2)
    dm.setup("fit")
    one = IdiomDataModule()
    one.setup("fit")
    assert dm.hparams.answer_words == 2 == dm.answer_words
    assert all(len(it.target.split()) == 2 for split in ("train", "val") for it in dm.items[split])
    # the same split by idiom, less the idioms too short for two-word answers
    assert {it.idiom for it in dm.items["train"]} < {it.idiom for it in one.items["train"]}
    batch = next(iter(dm.train_dataloader()))
    assert all(p.endswith(prefix) for p, prefix in zip(batch["prompt"], batch["prefix"], strict=True))
    with pytest.raises(Exception, match="answer_words must be a whole number >= 1"):
        IdiomDataModule(answer_words=0)
