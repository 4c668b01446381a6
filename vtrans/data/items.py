"""An idiom-completion item, its words, the prompt template, and the idiom's stable hash.

An item is an idiom split into ``prefix`` (all but the last word) and ``target`` (the last word),
or, with answers of K words (:func:`with_answer_words`), all but the last K and those K words.
Words are compared normalised (:func:`normalize_word`: lower case, letters and apostrophes, curly
ones straightened), and so is an idiom (:func:`idiom_hash`, what a checkpoint records of its
training idioms).
"""

from __future__ import annotations

import hashlib
import itertools
import string
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, replace

from vtrans.errors import UserError

DEFAULT_TEMPLATE = "Complete the idiom: {prefix}"

# an answer of K >= 2 words keeps at least this many words for its prompt: a prompt of one word
# ("once" -> "in a blue moon") leaves the answer to guessing, not to knowing the idiom
MIN_PROMPT_WORDS = 2

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


class DataError(UserError, ValueError):
    """A user-caused data problem; message is one clear line: file, line number, what is wrong."""


@dataclass(frozen=True)
class IdiomItem:
    """One idiom-completion item.

    Attributes:
        idiom: The idiom as written, whitespace-normalised.
        prefix: All but the answer's words.
        target: The answer: the last word, or the last K words (:func:`with_answer_words`), as written.
    """

    idiom: str
    prefix: str
    target: str


def _is_word_char(char: str) -> bool:
    return char.isalpha() or char == "'"


def normalize_word(text: str) -> str:
    """Lower-case and keep letters and apostrophes only (curly apostrophes become ``'``).

    Args:
        text: A word, e.g. a target or a completion word.

    Returns:
        The normalised word; ``""`` if ``text`` has no letters or apostrophes.
    """
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES).lower()
    return "".join(char for char in text if _is_word_char(char))


def _words(text: str) -> Iterator[tuple[str, str | None]]:
    """Each word of ``text`` (a run of letters/apostrophes that holds a letter), normalised, with
    the run of other characters right after it (None when nothing follows it yet)."""
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES)
    runs = [(is_word, "".join(run)) for is_word, run in itertools.groupby(text, key=_is_word_char)]
    for i, (is_word, run) in enumerate(runs):
        if is_word and any(char.isalpha() for char in run):
            yield normalize_word(run), runs[i + 1][1] if i + 1 < len(runs) else None


def first_words(text: str, k: int = 1) -> str:
    """The answer of ``k`` words in generated text: its first ``k`` words, normalised, joined by
    one space (fewer when the text has fewer).

    Args:
        text: Generated text, e.g. ``" blue moon.\nAnd then"``.
        k: How many words the answer has.

    Returns:
        ``"blue moon"`` for k = 2 above; ``""`` if the text has no word.
    """
    return " ".join(itertools.islice((word for word, _ in _words(text)), k))


def first_word(text: str) -> str:
    """The completion word of generated text.

    Args:
        text: Generated text, e.g. ``" cake.\nAnd then"``.

    Returns:
        The first run of letters/apostrophes that holds a letter, normalised with
        :func:`normalize_word`; ``""`` if there is none.
    """
    return first_words(text, 1)


def words_final(text: str, k: int = 1) -> bool:
    """Whether more text after ``text`` can no longer change :func:`first_words` of it (``k``
    words): its k-th word is followed by a character that is not part of a word (an unfinished
    character, ``\ufffd``, the start of a multi-byte one still being decoded, does not count)."""
    for count, (_, after) in enumerate(_words(text), start=1):
        if count == k:
            return after is not None and "\ufffd" not in after
    return False


def word_is_final(text: str) -> bool:
    """:func:`words_final` of one word: whether the completion word of ``text`` is complete."""
    return words_final(text, 1)


def answer_word_count(target: str) -> int:
    """The words of an answer as :func:`first_words` counts them (at least 1)."""
    return max(1, sum(1 for _ in _words(target)))


def _strip_trailing_punctuation(text: str) -> str:
    end = len(text)
    while end and not (text[end - 1].isalnum() or text[end - 1] in "'\u2019"):
        end -= 1
    return text[:end]


def split_idiom(idiom: str, answer_words: int = 1) -> IdiomItem:
    """Split an idiom into prefix and target.

    Args:
        idiom: The idiom as written; surrounding whitespace and trailing punctuation
            are stripped, inner whitespace is collapsed.
        answer_words: K, the words of the answer: the target is the last K words.

    Returns:
        The item: ``prefix`` is all words but the last K, ``target`` those K words.

    Raises:
        DataError: If the idiom has fewer than 2 words, its last word has no letters, or (K >= 2)
            fewer than :data:`MIN_PROMPT_WORDS` words are left for the prompt, or its last K words
            are not K words as :func:`first_words` counts them ("well-being" is two).
    """
    words = _strip_trailing_punctuation(" ".join(idiom.split())).split()
    if len(words) < 2:
        raise DataError(
            f"idiom {idiom.strip()!r} has fewer than 2 words; an item needs a prefix and a last word"
        )
    if not any(char.isalpha() for char in words[-1]):
        raise DataError(f"the last word of idiom {idiom.strip()!r} has no letters")
    if answer_words > 1 and len(words) - answer_words < MIN_PROMPT_WORDS:
        raise DataError(
            f"idiom {idiom.strip()!r} has {len(words)} words: too few for an answer of {answer_words} words "
            f"after a prompt of at least {MIN_PROMPT_WORDS}"
        )
    cut = len(words) - answer_words
    target = " ".join(words[cut:])
    if answer_words > 1 and answer_word_count(target) != answer_words:
        raise DataError(
            f"the last {answer_words} words of idiom {idiom.strip()!r} ({target!r}) are not {answer_words} words as "
            "answers are compared (a hyphen splits a word; a word needs a letter)"
        )
    return IdiomItem(idiom=" ".join(words), prefix=" ".join(words[:cut]), target=target)


def with_answer_words(items: list[IdiomItem], answer_words: int) -> tuple[list[IdiomItem], int]:
    """The items with answers of ``answer_words`` words, and how many were left out as too short.

    Each idiom is split again (:func:`split_idiom`); one that would keep fewer than
    :data:`MIN_PROMPT_WORDS` prompt words, or whose last K words are not K compared words, is left
    out. K = 1 returns ``items`` themselves (today's items: a prompt of one word is kept).

    Raises:
        DataError: K < 1.
    """
    if answer_words < 1:
        raise DataError(f"answer_words must be >= 1, got {answer_words}")
    if answer_words == 1:
        return items, 0
    kept = []
    for it in items:
        try:
            kept.append(replace(it, **_parts(split_idiom(it.idiom, answer_words))))
        except DataError:
            continue
    return kept, len(items) - len(kept)


def _parts(item: IdiomItem) -> dict[str, str]:
    return {"prefix": item.prefix, "target": item.target}


def validate_template(template: str) -> None:
    """Check that a prompt template has the field ``{prefix}`` and no other.

    Args:
        template: A ``str.format`` template, e.g. ``"Complete the idiom: {prefix}"``.

    Raises:
        DataError: If the template is malformed, lacks ``{prefix}`` or has other fields.
    """
    how = "write it with the field {prefix} and no other fields (double literal braces: {{ }})"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise DataError(f"malformed prompt template {template!r} ({err}); {how}") from None
    if fields != {"prefix"}:
        found = ", ".join("{" + name + "}" for name in sorted(fields)) or "no fields"
        raise DataError(f"prompt template {template!r} has {found}; {how}")


def render_prompt(template: str, prefix: str) -> str:
    """The prompt of an item.

    Args:
        template: A template accepted by :func:`validate_template`.
        prefix: The idiom's prefix.

    Returns:
        ``template.format(prefix=prefix)``.
    """
    validate_template(template)
    return template.format(prefix=prefix)


def idiom_key(idiom: str) -> str:
    """The normalised idiom: what deduplication and splitting compare."""
    return " ".join(word for word in map(normalize_word, idiom.split()) if word)


def idiom_hash(idiom: str) -> str:
    """A short stable hash of the normalised idiom: what a checkpoint records of its training idioms.

    Matches an idiom however it is written (case, punctuation, curly apostrophes) without keeping
    its text; ``person`` keeps it apart from the split hash (see :func:`split_items`).

    Args:
        idiom: The idiom as written.

    Returns:
        16 hex characters (blake2b, 8 bytes) of the idiom's normalised form.
    """
    return hashlib.blake2b(idiom_key(idiom).encode(), digest_size=8, person=b"vtrans-idiom").hexdigest()
