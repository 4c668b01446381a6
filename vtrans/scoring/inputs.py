"""Inputs to score: a :class:`Line` (a prompt, or why there is none), and input files read lazily.

**Input files** (:func:`open_input`): ``.jsonl``/``.ndjson`` hold one JSON object per line with
a string field ``prompt``; any other file is text, one prompt per line; ``-`` is standard
input (text). Every line gives one record: a line that is not valid UTF-8, is malformed JSON,
lacks the field, or is longer than 1 MiB becomes an error record naming its line number. A
missing, unreadable or binary file (NUL bytes, UTF-16) is refused as a whole
(:class:`InputError`, exit code 2 on the command line). The other fields of a JSONL line (an
``"id"``, say) travel with its :class:`Line` into its record.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from vtrans.errors import UserError

MAX_LINE_BYTES = 1 << 20


class InputError(UserError):
    """An input file that cannot be read at all (missing, a folder, binary)."""


@dataclass(frozen=True)
class Line:
    """One input to score: a prompt, or why there is none.

    Attributes:
        prompt: the prompt as given (``None`` when none could be read from the line).
        error: why the input cannot be scored (``None`` when it can, so far).
        line: its line number in an input file (``None`` for prompts given directly).
        fields: the input line's other JSON fields, passed through into its record.
    """

    prompt: Any
    error: str | None = None
    line: int | None = None
    fields: dict | None = None


def parse_txt_line(raw: bytes, number: int) -> Line:
    """One line of a text file (without its line ending) as a prompt; invalid UTF-8 is an error record."""
    try:
        return Line(raw.decode("utf-8"), None, number)
    except UnicodeDecodeError as err:
        return Line(
            raw.decode("utf-8", "replace"),
            f"line {number}: not valid UTF-8 (byte {raw[err.start]:#04x} at byte {err.start + 1}); save the file as UTF-8",
            number,
        )


def parse_jsonl_line(raw: bytes, number: int) -> Line:
    """One line of a JSONL file: an object with a string field ``prompt``; anything else is an error record."""
    expected = "expected a JSON object with a string field 'prompt'"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Line(None, f"line {number}: not valid UTF-8 (byte {raw[err.start]:#04x} at byte {err.start + 1})", number)
    if not text.strip():
        return Line(None, f"line {number}: blank line; {expected}", number)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return Line(None, f"line {number}: invalid JSON: {err.msg} (column {err.colno})", number)
    except (ValueError, RecursionError) as err:  # e.g. an integer of 5,000 digits, or nesting 10,000 deep
        return Line(None, f"line {number}: invalid JSON: {type(err).__name__}", number)
    if not isinstance(record, dict) or "prompt" not in record:
        return Line(None, f"line {number}: {expected}", number, record if isinstance(record, dict) else None)
    others = {k: v for k, v in record.items() if k != "prompt"} or None
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        return Line(None, f"line {number}: field 'prompt' is {type(prompt).__name__}, not a string", number, others)
    return Line(prompt, None, number, others)


def _raw_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the line ending) for each line; ``None`` for a line longer than ``limit``."""
    for number in itertools.count(1):
        chunk = stream.readline(limit + 1)
        if not chunk:
            return
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):  # skip the rest of the line, in bounded pieces
                chunk = stream.readline(limit)
            yield number, None
            continue
        raw = chunk.removesuffix(b"\n").removesuffix(b"\r")
        yield number, raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw


def parse_lines(stream: IO[bytes], kind: Literal["txt", "jsonl"] = "txt") -> Iterator[Line]:
    """Every line of a binary stream as a :class:`Line`, lazily."""
    parse = parse_jsonl_line if kind == "jsonl" else parse_txt_line
    for number, raw in _raw_lines(stream):
        if raw is None:
            yield Line(None, f"line {number}: longer than {MAX_LINE_BYTES} bytes", number)
        else:
            yield parse(raw, number)


def input_kind(path: str) -> Literal["txt", "jsonl"]:
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".ndjson") else "txt"


def open_input(path: str) -> tuple[Iterator[Line], int | None]:
    """The lines of an input file, read lazily, and how many there are (``None`` for stdin).

    Raises:
        InputError: the file (or standard input) is missing, a folder, unreadable, binary or
            empty; checked before anything is scored.
    """
    if path == "-":
        first = sys.stdin.buffer.readline(MAX_LINE_BYTES + 1)  # an empty input is refused before the model loads
        if not first:
            raise InputError("standard input is empty: nothing to score")
        return parse_lines(_Chained(first, sys.stdin.buffer), "txt"), None
    file = Path(path)
    if not file.exists():
        raise InputError(f"input file not found: {file}")
    if file.is_dir():
        raise InputError(f"input path is a folder, not a file: {file}")
    try:
        with file.open("rb") as f:
            head = f.read(8192)
            total, last = head.count(b"\n"), head
            for block in iter(lambda: f.read(1 << 20), b""):
                total, last = total + block.count(b"\n"), block
    except OSError as err:
        raise InputError(f"cannot read input file {file}: {err.strerror or err}") from None
    if b"\x00" in head or head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{file} is not a UTF-8 text file (it holds NUL bytes: binary, or UTF-16?); save it as UTF-8")
    total += bool(last) and not last.endswith(b"\n")
    if total == 0:
        raise InputError(f"input file {file} is empty: nothing to score")

    def lines() -> Iterator[Line]:
        with file.open("rb") as f:
            yield from parse_lines(f, input_kind(path))

    return lines(), total


class _Chained:
    """The lines of a binary stream whose first line was already read: ``first``, then the rest."""

    def __init__(self, first: bytes, stream: IO[bytes]) -> None:
        self.first, self.stream = first, stream

    def readline(self, size: int = -1) -> bytes:
        if self.first:
            line, self.first = self.first, b""
            return line
        return self.stream.readline(size)
