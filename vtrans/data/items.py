"""An idiom-completion item, its words, the prompt template, and the idiom's stable hash.

An item is an idiom split into ``prefix`` (all but the last word) and ``target`` (the last word).
Words are compared normalised (:func:`normalize_word`: lower case, letters and apostrophes, curly
ones straightened), and so is an idiom (:func:`idiom_hash`, what a checkpoint records of its
training idioms).
"""

from __future__ import annotations

import hashlib
import itertools
import string
import unicodedata
from dataclasses import dataclass

from vtrans.errors import UserError

DEFAULT_TEMPLATE = "Complete the idiom: {prefix}"

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


class DataError(UserError, ValueError):
    """A user-caused data problem; message is one clear line: file, line number, what is wrong."""


@dataclass(frozen=True)
class IdiomItem:
    """One idiom-completion item.

    Attributes:
        idiom: The idiom as written, whitespace-normalised.
        prefix: All but the last word.
        target: The last word, as written.
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


def first_word(text: str) -> str:
    """The completion word of generated text.

    Args:
        text: Generated text, e.g. ``" cake.\\nAnd then"``.

    Returns:
        The first run of letters/apostrophes that holds a letter, normalised with
        :func:`normalize_word`; ``""`` if there is none.
    """
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES)
    for is_word, run in itertools.groupby(text, key=_is_word_char):
        word = "".join(run)
        if is_word and any(char.isalpha() for char in word):
            return normalize_word(word)
    return ""


def word_is_final(text: str) -> bool:
    """Whether more text after ``text`` can no longer change :func:`first_word` of it: its
    word is followed by a character that is not part of a word (an unfinished character,
    ``\ufffd``, the start of a multi-byte one still being decoded, does not count)."""
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES)
    runs = itertools.groupby(text, key=_is_word_char)
    for is_word, run in runs:
        if is_word and any(char.isalpha() for char in run):
            after = next(runs, None)
            return after is not None and "\ufffd" not in "".join(after[1])
    return False


def _strip_trailing_punctuation(text: str) -> str:
    end = len(text)
    while end and not (text[end - 1].isalnum() or text[end - 1] in "'\u2019"):
        end -= 1
    return text[:end]


def split_idiom(idiom: str) -> IdiomItem:
    """Split an idiom into prefix and target.

    Args:
        idiom: The idiom as written; surrounding whitespace and trailing punctuation
            are stripped, inner whitespace is collapsed.

    Returns:
        The item: ``prefix`` is all words but the last, ``target`` the last word.

    Raises:
        DataError: If the idiom has fewer than 2 words or its last word has no letters.
    """
    words = _strip_trailing_punctuation(" ".join(idiom.split())).split()
    if len(words) < 2:
        raise DataError(
            f"idiom {idiom.strip()!r} has fewer than 2 words; an item needs a prefix and a last word"
        )
    if not any(char.isalpha() for char in words[-1]):
        raise DataError(f"the last word of idiom {idiom.strip()!r} has no letters")
    return IdiomItem(idiom=" ".join(words), prefix=" ".join(words[:-1]), target=words[-1])


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
