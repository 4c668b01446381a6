"""Data specs and the readers of each file format: the items of ``builtin``, ``txt:``, ``epie:``,
``slide:``, ``magpie:`` and ``wordnet:`` data, deduplicated by normalised idiom, in file order.

A file that cannot be read, or a line that is not an idiom, is a :class:`DataError` of one line:
the file, the line number, what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from vtrans.data.items import DataError, IdiomItem, idiom_key, split_idiom

SPLITS = ("train", "val", "test")
FILE_KINDS = ("txt", "epie", "slide", "magpie", "wordnet")
KINDS = ("builtin", *FILE_KINDS)


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
        name = "vtrans/data/idioms.txt (built-in)"
        lines = resources.files("vtrans.data").joinpath("idioms.txt").read_text(encoding="utf-8").split("\n")
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
        items.setdefault(idiom_key(item.idiom), item)
    if not items:
        raise DataError(f"{name}: no idioms found")
    return list(items.values())
