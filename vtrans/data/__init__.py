"""Idiom items, loaders for each data format, and deterministic splits.

An item is an idiom split into ``prefix`` (all but the last word) and ``target``
(the last word; the last K words with answers of K words, :func:`with_answer_words`). Data is named by a spec (see :func:`parse_spec`): ``builtin`` or
``builtin:SPLIT`` (the packaged ``vtrans/data/idioms.txt``), ``txt:PATH``, ``epie:PATH``,
``slide:PATH``, ``magpie:PATH`` or ``wordnet:PATH`` (the multi-word expressions of a WordNet
database). Splits are by idiom and come from a seeded hash,
so they never depend on file order or ``PYTHONHASHSEED``.

* ``items``: an item and its words (normalised, the completion word of generated text), the
  prompt template, and the idiom's stable hash;
* ``formats``: data specs and the readers of each file format (plain Python, one-line errors);
* ``splits``: the seeded split by idiom.
"""

from vtrans.data.formats import FILE_KINDS, KINDS, SPLITS, WORDNET_POS, load_idioms, parse_spec
from vtrans.data.items import (
    DEFAULT_TEMPLATE,
    MIN_PROMPT_WORDS,
    DataError,
    IdiomItem,
    answer_word_count,
    first_word,
    first_words,
    idiom_hash,
    idiom_key,
    normalize_word,
    render_prompt,
    split_idiom,
    validate_template,
    with_answer_words,
    word_is_final,
    words_final,
)
from vtrans.data.splits import check_fractions, load_split, split_items

__all__ = [
    "DEFAULT_TEMPLATE",
    "MIN_PROMPT_WORDS",
    "FILE_KINDS",
    "KINDS",
    "SPLITS",
    "WORDNET_POS",
    "DataError",
    "IdiomItem",
    "check_fractions",
    "answer_word_count",
    "first_word",
    "first_words",
    "idiom_hash",
    "idiom_key",
    "load_idioms",
    "load_split",
    "normalize_word",
    "parse_spec",
    "render_prompt",
    "split_idiom",
    "split_items",
    "validate_template",
    "with_answer_words",
    "word_is_final",
    "words_final",
]
