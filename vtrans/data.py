"""Idiom items, loaders for each data format, deterministic splits and the DataModule.

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

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from vtrans.config import check_all
from vtrans.errors import ConfigError, UserError

DEFAULT_TEMPLATE = "Complete the idiom: {prefix}"
SPLITS = ("train", "val", "test")
FILE_KINDS = ("txt", "epie", "slide", "magpie", "wordnet")
KINDS = ("builtin", *FILE_KINDS)
BATCH_KEYS = ("idiom", "prefix", "target", "prompt")

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


def collate_rows(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Batch rows into a dict of lists of str with keys :data:`BATCH_KEYS`."""
    return {key: [row[key] for row in rows] for key in BATCH_KEYS}


def _rows(items: list[IdiomItem], template: str) -> list[dict[str, str]]:
    return [
        {
            "idiom": it.idiom,
            "prefix": it.prefix,
            "target": it.target,
            "prompt": render_prompt(template, it.prefix),
        }
        for it in items
    ]


class EpochShuffle(RandomSampler):
    """A random order that is a function of (seed, epoch) alone.

    Lightning calls ``set_epoch`` before every training epoch, so a run resumed at epoch e
    sees the same order as an uninterrupted run does at epoch e (a generator seeded once per
    ``train_dataloader`` call would restart its sequence on resume). Under a distributed
    strategy Lightning replaces a ``RandomSampler`` by a ``DistributedSampler``, which also
    shuffles by (seed, epoch).
    """

    def __init__(
        self, data_source, seed: int = 0, lengths: list[int] | None = None, batch_size: int = 1, pool: int = 50
    ) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        if self.lengths is None:
            yield from order
            return
        # length buckets: within pools of `pool` batches, sort by length and cut into batches,
        # then shuffle the batches, so each batch holds items of similar length (little padding)
        span = self.pool * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: self.lengths[i])
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(
    data: str,
    template: str,
    batch_size: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    num_workers: int,
    max_items: int | None,
    length_bucketed: bool,
) -> None:
    """Check the DataModule's settings when they are given, before any data is read.

    Raises:
        ConfigError: the first setting out of range or of the wrong kind, with what is allowed.
            A data spec naming a file that does not exist is found later, in ``setup``.
    """
    checks = [
        (isinstance(data, str), f"data must be a data spec (builtin, builtin:SPLIT or KIND:PATH), got {data!r}"),
        (isinstance(template, str), f"template must be a string with the field {{prefix}}, got {template!r}"),
        (_whole(batch_size) and batch_size >= 1, f"batch_size must be a whole number >= 1, got {batch_size!r}"),
        (_whole(seed), f"seed must be a whole number, got {seed!r}"),
        (
            _whole(num_workers) and num_workers >= 0,
            f"num_workers must be a whole number >= 0 (0: load in the main process), got {num_workers!r}",
        ),
        (
            max_items is None or (_whole(max_items) and max_items >= 1),
            f"max_items must be a whole number >= 1, or null to keep every item, got {max_items!r}",
        ),
        (isinstance(length_bucketed, bool), f"length_bucketed must be true or false, got {length_bucketed!r}"),
    ]
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        checks.append((is_number, f"{name} must be a number in [0, 1), got {value!r}"))
    check_all(checks)
    try:  # the checks that the data functions share with evaluate and score
        parse_spec(data)
        validate_template(template)
        _check_fractions(val_fraction, test_fraction)
    except DataError as err:
        raise ConfigError(str(err)) from None


class IdiomDataModule(L.LightningDataModule):
    """Idiom-completion batches: dicts of lists of str with keys idiom, prefix, target, prompt.

    Tokenisation happens in the LightningModule. ``predict`` uses the test split. Its
    ``state_dict`` (which Lightning saves into every checkpoint, under the class name) records the
    idioms the latent was trained on, as sorted :func:`idiom_hash` values, so that evaluation can
    leave them out whatever the training data was.
    """

    def __init__(
        self,
        data: str = "builtin",
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
        max_items: int | None = None,
        length_bucketed: bool = False,
    ) -> None:
        """Check the settings (see :func:`check_settings`); data is read in ``setup``.

        Args:
            data: Data spec: ``builtin`` (the packaged idiom set), ``builtin:SPLIT``
                (every stage uses that split), ``txt:PATH`` or ``epie:PATH`` (one idiom
                per line), ``slide:PATH`` (SLIDE TSV, column ``Idiom``) or
                ``magpie:PATH`` (MAGPIE JSONL, field ``idiom``) or ``wordnet:PATH`` (a WordNet database directory or one of its data.POS files: its multi-word expressions).
            template: Prompt template with the single field ``{prefix}``.
            batch_size: Items per batch, at least 1.
            seed: Seed of the idiom split and of the training shuffle.
            val_fraction: Expected fraction of idioms in the validation split, in [0, 1).
            test_fraction: Expected fraction of idioms in the test split, in [0, 1);
                val_fraction + test_fraction must be below 1.
            num_workers: DataLoader worker processes (0: load in the main process).
            max_items: Keep only the first N items of each split (quick runs); None keeps all.
            length_bucketed: Group training items of similar prompt length into batches
                (less padding); the batches are still shuffled by (seed, epoch).
        """
        super().__init__()
        check_settings(data, template, batch_size, seed, val_fraction, test_fraction, num_workers, max_items, length_bucketed)
        self.save_hyperparameters()
        self.items: dict[str, list[IdiomItem]] = {}
        self.trained_before: set[str] = set()  # hashes from the checkpoint a run resumes from

    @classmethod
    def from_items(
        cls,
        train: list[IdiomItem],
        val: list[IdiomItem] | None = None,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 32,
        seed: int = 0,
        length_bucketed: bool = False,
    ) -> IdiomDataModule:
        """A DataModule over items chosen by the caller (cross-fitting: one fold's training idioms).

        ``seed`` drives the training shuffle only: nothing is split here.
        """
        module = cls(template=template, batch_size=batch_size, seed=seed, length_bucketed=length_bucketed)
        module.items = {"train": list(train), "val": list(val or []), "test": []}
        module._given = True
        return module

    def _load(self, split: str) -> None:
        if getattr(self, "_given", False):
            return
        hp = self.hparams
        items = load_split(hp.data, split, hp.seed, hp.val_fraction, hp.test_fraction)
        self.items[split] = items[: hp.max_items] if hp.max_items is not None else items

    def setup(self, stage: str | None = None) -> None:
        """Load the splits a stage needs: fit (train, val), validate, test, predict (test)."""
        needed = {"fit": SPLITS[:2], "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, SPLITS) if stage else SPLITS:
            self._load(split)
        if stage == "fit" and parse_spec(self.hparams.data)[1] in (*SPLITS, "all"):
            raise DataError(
                f"data {self.hparams.data!r} names one split, but fit needs separate train and val splits; use 'builtin'"
            )
        if stage == "fit" and not self.items["train"]:
            raise DataError(
                f"the train split of {self.hparams.data!r} is empty; use more idioms or smaller val/test fractions"
            )

    def state_dict(self) -> dict[str, list[str]]:
        """The training idioms, hashed: this run's train split (as loaded, after ``max_items``) and a resumed run's."""
        trained = self.trained_before | {idiom_hash(item.idiom) for item in self.items.get("train", [])}
        return {"train_idiom_hashes": sorted(trained)} if trained else {}

    def load_state_dict(self, state_dict: dict[str, list[str]]) -> None:
        """Keep the training idioms of the checkpoint a run resumes from: the latent has seen them too."""
        self.trained_before = set(state_dict.get("train_idiom_hashes", []))

    def _sampler(self, rows: list[dict[str, str]]) -> EpochShuffle:
        if not self.hparams.get("length_bucketed", False):
            return EpochShuffle(rows, self.hparams.seed)
        lengths = [len(row["prompt"]) + len(row["target"]) for row in rows]  # characters: a cheap proxy
        return EpochShuffle(rows, self.hparams.seed, lengths, self.hparams.batch_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.items:
            self._load(split)
        rows = _rows(self.items[split], self.hparams.template)
        return DataLoader(
            rows,
            batch_size=self.hparams.batch_size,
            sampler=self._sampler(rows) if shuffle else None,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_rows,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: epoch e's order depends on (``seed``, e) only (see :class:`EpochShuffle`)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Test-split batches in file order."""
        return self._loader("test", shuffle=False)
