"""The WordNet loader (``wordnet:PATH``) and the variant filter on extra training idioms."""

from pathlib import Path

import pytest

from vtrans.data import DataError, IdiomItem, load_idioms, split_idiom
from vtrans.evaluation.folds import extra_training_items

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
LEXNAMES = "00\tadj.all\t3\n02\tadv.all\t4\n05\tnoun.animal\t1\n09\tnoun.cognition\t1\n18\tnoun.person\t1\n41\tverb.social\t2\n"


def _synset(offset: int, lexfile: int, pos: str, *words: str) -> str:
    lemmas = " ".join(f"{word} 0" for word in words)
    return f"{offset:08d} {lexfile:02d} {pos} {len(words):02x} {lemmas} 000 | a gloss  \n"


@pytest.fixture
def wordnet(tmp_path: Path) -> Path:
    db = tmp_path / "dict"
    db.mkdir()
    (db / "lexnames").write_text(LEXNAMES)
    (db / "data.verb").write_text(
        LICENCE
        + _synset(100, 41, "v", "hit_the_jackpot", "strike_it_rich")
        + _synset(200, 41, "v", "pull_up_stakes", "move")  # one word: not an expression
        + _synset(300, 41, "v", "beat_around_the_bush", "beat_about_the_bush")
    )
    (db / "data.adj").write_text(LICENCE + _synset(400, 0, "s", "smart_as_a_whip(a)", "up_to_date"))
    (db / "data.adv").write_text(LICENCE + _synset(500, 2, "r", "by_the_way", "out_of_place", "in_the_Bible_Belt"))
    (db / "data.noun").write_text(
        LICENCE
        + _synset(600, 9, "n", "law_of_gravitation", "two_words")
        + _synset(700, 18, "n", "very_important_person")  # noun.person: a term, not an expression
        + _synset(800, 5, "n", "little_brown_myotis")  # noun.animal
        + _synset(900, 9, "n", "Law_of_Moses")  # capitalised: a name
    )
    return db


def test_wordnet_keeps_lowercase_expressions_of_three_words_or_more(wordnet):
    idioms = [it.idiom for it in load_idioms(f"wordnet:{wordnet}")]
    assert idioms == [
        "hit the jackpot",
        "strike it rich",
        "pull up stakes",
        "beat around the bush",
        "beat about the bush",
        "smart as a whip",  # the adjective marker (a) is not part of the lemma
        "up to date",
        "by the way",
        "out of place",
        "law of gravitation",
    ]


def test_wordnet_reads_one_data_file(wordnet):
    items = load_idioms(f"wordnet:{wordnet / 'data.adv'}")
    assert [it.idiom for it in items] == ["by the way", "out of place"]
    assert items[0] == IdiomItem(idiom="by the way", prefix="by the", target="way")


def test_without_lexnames_no_noun_file_is_left_out(wordnet):
    (wordnet / "lexnames").unlink()
    idioms = {it.idiom for it in load_idioms(f"wordnet:{wordnet / 'data.noun'}")}
    assert idioms == {"law of gravitation", "very important person", "little brown myotis"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda db: db / "missing", "not found"),
        (lambda db: db / "lexnames", "data.verb, data.adj"),
        (lambda db: db.parent, "no WordNet data files"),
    ],
)
def test_wordnet_path_errors_say_what_is_expected(wordnet, make, message):
    with pytest.raises(DataError, match=message):
        load_idioms(f"wordnet:{make(wordnet)}")


def test_a_malformed_data_line_is_named_by_file_and_line(wordnet):
    (wordnet / "data.verb").write_text(LICENCE + _synset(100, 41, "v", "hit_the_jackpot") + "00000200 41 v zz\n")
    with pytest.raises(DataError, match=r"data\.verb:3: not a WordNet data line"):
        load_idioms(f"wordnet:{wordnet}")


def test_extra_idioms_drop_scored_idioms_and_their_variants():
    scored = [split_idiom(s) for s in ("beat around the bush", "blow your stack", "spill the beans")]
    extra = [
        split_idiom(s)
        for s in (
            "Beat around the bush!",  # the same idiom, written differently
            "beat about the bush",  # a variant: same first and last word
            "blow one's stack",  # a variant with WordNet's slot
            "spill the tea",  # shares the first word only: kept
            "full of beans",  # shares the last word only: kept
            "hit the jackpot",
        )
    ]
    assert [it.idiom for it in extra_training_items(extra, scored)] == ["spill the tea", "full of beans", "hit the jackpot"]
