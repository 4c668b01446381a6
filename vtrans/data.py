"""Idiom items, loaders for each data format, and deterministic splits.

An item is an idiom split into ``prefix`` (all but the last word) and ``target``
(the last word). Data is named by a spec (see :func:`parse_spec`): ``builtin`` or
``builtin:SPLIT`` (the packaged ``vtrans/idioms.txt``), ``txt:PATH``, ``epie:PATH``,
``slide:PATH``, ``magpie:PATH`` or ``wordnet:PATH`` (the multi-word expressions of a WordNet
database). Splits are by idiom and come from a seeded hash,
so they never depend on file order or ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import string
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vtrans.errors import UserError

DEFAULT_TEMPLATE = "Complete the idiom: {prefix}"
SPLITS = ("train", "val", "test")
FILE_KINDS = ("txt", "epie", "slide", "magpie", "wordnet")
KINDS = ("builtin", *FILE_KINDS)

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


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Parse a data spec.

    Args:
        spec: ``builtin``, ``builtin:SPLIT`` or ``KIND:PATH`` with KIND one of
            txt, epie, slide, magpie, wordnet.

    Returns:
        ``(kind, split_or_path)``: the split (or None) for builtin, the path otherwise.

    Raises:
        DataError: On an unknown kind or split, or a missing path.
    """
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise DataError(
            f"unknown data spec {spec!r}; use builtin, builtin:SPLIT or KIND:PATH with KIND one of "
            + ", ".join(FILE_KINDS)
        )
    if kind == "builtin":
        if not sep:
            return kind, None
        if rest not in (*SPLITS, "all"):
            raise DataError(f"unknown split {rest!r} in data spec {spec!r}; valid: {', '.join(SPLITS)}, all")
        return kind, rest
    if not rest.strip():
        raise DataError(f"data spec {spec!r} names no file; write {kind}:PATH")
    return kind, rest


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (BOM and CR stripped), or a one-line DataError."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"data path is a directory, not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {data[err.start]:#04x}); save the file as UTF-8"
        ) from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _plain_idioms(lines: list[str], comments: bool) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line and not (comments and line.startswith("#")):
            yield number, line


def _slide_idioms(lines: list[str], path: str) -> Iterator[tuple[int, str]]:
    header = [name.strip() for name in lines[0].split("\t")] if lines else []
    if "Idiom" not in header:
        found = ", ".join(repr(name) for name in header if name) or "nothing"
        raise DataError(
            f"{path}:1: the header row has no 'Idiom' column (found {found}); is this a SLIDE TSV?"
        )
    column = header.index("Idiom")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) <= column:
            raise DataError(
                f"{path}:{number}: {len(cells)} tab-separated cells, the 'Idiom' column is number {column + 1}"
            )
        yield number, cells[column]


def _magpie_idioms(lines: list[str], path: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON: {err.msg} (column {err.colno})") from None
        idiom = record.get("idiom") if isinstance(record, dict) else None
        if not isinstance(idiom, str):
            raise DataError(f"{path}:{number}: expected a JSON object with a string field 'idiom'")
        yield number, idiom


WORDNET_POS = ("verb", "adj", "adv", "noun")
# Noun lexicographer files of names and taxonomy (animals, body parts, foods, groups, objects,
# people, plants, substances): their multi-word lemmas are terms, not fixed expressions.
_WORDNET_TERM_FILES = frozenset(
    {"noun.animal", "noun.body", "noun.food", "noun.group", "noun.object", "noun.person", "noun.plant", "noun.substance"}
)
_WORDNET_LEMMA = re.compile(r"^[a-z'-]+(?:_[a-z'-]+){2,}$")


def _wordnet_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"WordNet path not found: {path}")
    if path.is_file():
        if not path.name.startswith("data.") or path.suffix.lstrip(".") not in WORDNET_POS:
            raise DataError(f"{path}: a WordNet data file is named data.verb, data.adj, data.adv or data.noun")
        return [path]
    files = [path / f"data.{pos}" for pos in WORDNET_POS if (path / f"data.{pos}").is_file()]
    if not files:
        raise DataError(f"{path}: no WordNet data files (data.verb, data.adj, data.adv, data.noun) in this directory")
    return files


def _wordnet_lexnames(files: list[Path]) -> dict[int, str]:
    """The lexicographer file names by number, from the database's ``lexnames`` file when present."""
    lexnames = files[0].parent / "lexnames"
    if not lexnames.is_file():
        return {}
    names = {}
    for line in lexnames.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            names[int(fields[0])] = fields[1]
    return names


def _wordnet_idioms(path: Path) -> Iterator[tuple[str, str]]:
    """The fixed multi-word expressions of a WordNet database (WNdb format).

    Kept: lemmas of three words or more, all lower case (WordNet writes names capitalised), and,
    among nouns, none from the lexicographer files of names and taxonomy. ``one's`` and ``someone``
    stay as written: they are how WordNet spells an idiom's open slot.
    """
    files = _wordnet_files(path)
    lexnames = _wordnet_lexnames(files)
    for file in files:
        with file.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if line.startswith("  ") or not line.strip():
                    continue  # the licence header, or a blank line
                fields = line.split()
                try:
                    lexfile, count = int(fields[1]), int(fields[3], 16)
                    words = [fields[4 + 2 * i] for i in range(count)]
                except (IndexError, ValueError):
                    raise DataError(f"{file}:{number}: not a WordNet data line (offset lex_filenum ss_type w_cnt word ...)") from None
                if lexnames.get(lexfile) in _WORDNET_TERM_FILES:
                    continue
                for word in words:
                    lemma = re.sub(r"\([a-z]+\)$", "", word)  # adjective markers: (a), (p), (ip)
                    if _WORDNET_LEMMA.match(lemma):
                        yield f"{file}:{number}", lemma.replace("_", " ")


def _idiom_key(idiom: str) -> str:
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
    return hashlib.blake2b(_idiom_key(idiom).encode(), digest_size=8, person=b"vtrans-idiom").hexdigest()


def load_idioms(spec: str) -> list[IdiomItem]:
    """All items of a data spec, deduplicated by normalised idiom, in file order.

    Args:
        spec: A data spec (see :func:`parse_spec`); a split in it is ignored here.

    Returns:
        The items; no split is applied.

    Raises:
        DataError: On a missing or unreadable file, a malformed line or an empty file.
    """
    kind, arg = parse_spec(spec)
    if kind == "wordnet":
        return _dedupe(_wordnet_idioms(Path(arg)), arg)
    if kind == "builtin":
        name = "vtrans/idioms.txt (built-in)"
        lines = resources.files("vtrans").joinpath("idioms.txt").read_text(encoding="utf-8").split("\n")
    else:
        name = arg
        lines = _read_lines(Path(arg))
    if kind == "slide":
        numbered = _slide_idioms(lines, name)
    elif kind == "magpie":
        numbered = _magpie_idioms(lines, name)
    else:
        numbered = _plain_idioms(lines, comments=kind in ("builtin", "txt"))
    return _dedupe(((f"{name}:{number}", idiom) for number, idiom in numbered), name)


def _dedupe(located: Iterator[tuple[str, str]], name: str) -> list[IdiomItem]:
    """Items from (location, idiom) pairs, the first of each normalised idiom kept, in order."""
    items: dict[str, IdiomItem] = {}
    for where, idiom in located:
        try:
            item = split_idiom(idiom)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        items.setdefault(_idiom_key(item.idiom), item)
    if not items:
        raise DataError(f"{name}: no idioms found")
    return list(items.values())


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise DataError(f"{name}={value} is out of range; use a value in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing to train on; keep the sum below 1"
        )


def _split_of(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split_items(
    items: list[IdiomItem],
    split: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> list[IdiomItem]:
    """The items of one split, in input order.

    Each idiom goes to a split by a stable hash of (seed, normalised idiom), so an
    idiom's split depends on nothing else: not file order, not other idioms, not
    ``PYTHONHASHSEED``.

    Args:
        items: Items to split.
        split: ``train``, ``val``, ``test`` or ``all``.
        seed: Seed of the split; a different seed gives a different split.
        val_fraction: Expected fraction of idioms in ``val``, in [0, 1).
        test_fraction: Expected fraction of idioms in ``test``, in [0, 1).

    Returns:
        The items whose idiom falls in ``split`` (all of them for ``all``).

    Raises:
        DataError: On an unknown split name or invalid fractions.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}, all")
    _check_fractions(val_fraction, test_fraction)
    if split == "all":
        return list(items)
    return [
        item
        for item in items
        if _split_of(_idiom_key(item.idiom), seed, val_fraction, test_fraction) == split
    ]


def load_split(
    spec: str,
    split: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> list[IdiomItem]:
    """Load one split of a data spec.

    Args:
        spec: A data spec (see :func:`parse_spec`).
        split: The split to use unless the spec names one (``builtin:test``);
            None means ``all``.
        seed: Seed of the split.
        val_fraction: Expected fraction of idioms in ``val``.
        test_fraction: Expected fraction of idioms in ``test``.

    Returns:
        The items of the split.
    """
    kind, arg = parse_spec(spec)
    chosen = (arg if kind == "builtin" else None) or split or "all"
    return split_items(load_idioms(spec), chosen, seed, val_fraction, test_fraction)
