"""Score prompts with a trained checkpoint: the Python API behind ``vtrans score``.

    >>> scorer = Scorer.from_checkpoint("checkpoints/smollm2/last.ckpt")
    >>> for record in scorer.score(["Complete the idiom: the early bird catches the"]):
    ...     print(record["completion"], record["scores"]["lens_ce"])

With a model of one's own already loaded, and a latent trained on it and saved with
``save_pretrained``: ``Scorer.from_pretrained(folder, backbone=Backbone.from_model(model, tokenizer))``.

For every prompt the base model (latent off) completes it, and every requested estimator
scores that completion, exactly as in ``vtrans evaluate`` (through the same
:class:`vtrans.estimators.runner.Runner`); there is no target, so no label.

**Records.** One per input, in input order:
``{"prompt": str, "template": str | None, "completion": str, "completion_word": str,
"scores": {NAME: float | None}}`` (``None`` where a score is not finite; ``template`` the one
applied, ``None`` for a prompt scored verbatim; ``completion_word`` the first word of the
completion, normalised as ``vtrans evaluate`` writes it), with ``"truncated": N`` added when N
tokens were cut from the prompt's left, and ``"random_weights": true`` in every record when the base
model's weights are random (``random:NAME``). An input that cannot be scored gives
``{"prompt": ..., "error": "..."}`` (plus ``"line": N`` when it came from a file) and the other
inputs are scored as usual. The other fields of a JSONL input line (an ``"id"``, say) are
passed through unchanged into its record, error or not.

**Templates.** A checkpoint's latent was trained on prompts made by a template from an
idiom's beginning (``"Complete the idiom: {prefix}"``): :meth:`Scorer.from_checkpoint` applies
that template to every input by default (``template="ckpt"``), so an input is an idiom's
beginning, as in training. ``template=None`` scores the inputs verbatim.

**Prompt policy.**

* An empty or blank prompt (only whitespace), a value that is not a string, or a string that
  is not valid Unicode (a lone surrogate) is an error record.
* A prompt longer than the model's context is **truncated from the left** (its end, which
  predicts the completion, is kept): the model's context C (``max_position_embeddings``)
  must hold the prompt and ``max_new_tokens`` generated tokens, so the prompt keeps its last
  C − ``max_new_tokens`` tokens. A warning naming the input goes to stderr and the record
  carries ``"truncated": N``. With ``long_prompts="refuse"`` such a prompt is an error record
  instead. The template, when one is given, is applied before the length is measured.

**Streaming.** :meth:`Scorer.score` consumes its iterable lazily, ``batch_size`` prompts at a
time, and yields each batch's records before reading the next: memory stays bounded however
long the input. A tqdm bar on stderr shows progress unless ``quiet`` (or the input is known
to fit in one batch).

**Input files** (:func:`open_input`): ``.jsonl``/``.ndjson`` hold one JSON object per line with
a string field ``prompt``; any other file is text, one prompt per line; ``-`` is standard
input (text). Every line gives one record: a line that is not valid UTF-8, is malformed JSON,
lacks the field, or is longer than 1 MiB becomes an error record naming its line number. A
missing, unreadable or binary file (NUL bytes, UTF-16) is refused as a whole
(:class:`InputError`, exit code 2 on the command line).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, Any, Literal

import torch
from tqdm.auto import tqdm

from vtrans import log
from vtrans.config import EstimatorConfig
from vtrans.data import validate_template
from vtrans.errors import ConfigError, UserError
from vtrans.estimators import distributed
from vtrans.estimators.distributed import Shard
from vtrans.estimators.registry import NAMES, SCORABLE, SCORE_DEFAULTS, why_not

MAX_LINE_BYTES = 1 << 20
SETTINGS = frozenset(f.name for f in fields(EstimatorConfig))
LongPrompts = Literal["truncate", "refuse"]


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


# --------------------------------------------------------------------------- input files


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


# --------------------------------------------------------------------------- the request


def prior_of(module) -> str | None:
    """The prior of a latent (``standard`` or ``conditional``), or None without one."""
    return None if module is None else module.latent.prior


def default_estimators(prior: str | None, aggregate: str = "first") -> list[str]:
    """Every single-pass and latent estimator that applies to a latent with this prior (no MC
    dropout, no sampling, no fitted one)."""
    return [n for n in SCORE_DEFAULTS if why_not(n, prior, aggregate) is None]


def check_estimators(names: list[str] | None, prior: str | None, aggregate: str = "first") -> list[str]:
    """The estimators to score with (the defaults for ``None``), each one ``score`` can run with a
    latent of this prior; checked before any model loads.

    Raises:
        ConfigError: an unknown name (the message lists those ``score`` can run), a fitted one
            (``registry.fitted``), one the latent or the aggregate does not allow, or none at all.
    """
    if names is None:
        names = default_estimators(prior, aggregate)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ConfigError(f"unknown estimator(s) {', '.join(unknown)}: score can run {', '.join(SCORABLE)}")
    fitted = [n for n in names if n not in SCORABLE]
    if fitted:
        raise ConfigError(
            f"{', '.join(fitted)} is fitted on labelled items: use vtrans evaluate; score can run {', '.join(SCORABLE)}"
        )
    for name in names:
        why = why_not(name, prior, aggregate)
        if why is not None:
            raise ConfigError(f"{name} {why}")
    if not names:
        raise ConfigError("no estimators asked for: name at least one")
    return list(dict.fromkeys(names))


def check_request(
    ckpt: dict, estimators: list[str] | None, template: str | None, config: EstimatorConfig
) -> tuple[list[str], str | None]:
    """The estimators and the template a request to score with a checkpoint comes to, from the
    checkpoint's contents (``vtrans.latent.checkpoint.read``) alone: nothing loads.

    Raises:
        ConfigError, DataError: see :func:`check_estimators` and :func:`resolve_template`.
    """
    from vtrans.latent import checkpoint

    names = check_estimators(None if estimators is None else list(estimators), checkpoint.prior_in(ckpt), config.aggregate)
    return names, resolve_template(template, checkpoint.template_in(ckpt))


def resolve_template(template: str | None, recorded: str | None) -> str | None:
    """The template to apply: ``ckpt`` gives the checkpoint's (``recorded``; the built-in one when
    it records none), ``None`` or ``none`` none at all (prompts verbatim), anything else itself.

    Raises:
        DataError: a template without exactly one ``{prefix}`` field.
    """
    from vtrans.data import DEFAULT_TEMPLATE

    if template is None or template == "none":
        return None
    if template == "ckpt":
        template = recorded or DEFAULT_TEMPLATE
    validate_template(template)
    return template


def _batched(iterable: Iterable, n: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _number(value: torch.Tensor) -> float | None:
    x = float(value)
    return x if x == x and abs(x) != float("inf") else None


class Scorer:
    """Completions and uncertainty scores for prompts, from a trained latent (see the module docstring)."""

    def __init__(
        self,
        module,
        estimators: list[str] | None = None,
        template: str | None = None,
        *,
        config: EstimatorConfig | None = None,
        long_prompts: LongPrompts = "truncate",
        quiet: bool = False,
        **settings: Any,
    ) -> None:
        """Wrap a loaded latent model (use :meth:`from_checkpoint` to load one).

        Args:
            module: a ``vtrans.latent.model.LatentModel`` with its backbone, in eval mode.
            estimators: names from ``vtrans.estimators.registry.SCORABLE`` (default:
                :func:`default_estimators`); ``mc_dropout_*`` may be asked for (T = ``passes``
                forwards each), a fitted one may not.
            template: a template with one ``{prefix}`` field applied to every input; ``None``
                scores the inputs verbatim (:meth:`from_checkpoint` applies the checkpoint's).
            config: the estimator settings (batch size, samples of z, MC dropout passes, seed, ...).
            long_prompts: ``truncate`` (from the left, with a warning) or ``refuse`` (an error record).
            quiet: no progress bar and no warnings on stderr.
            settings: fields of :class:`vtrans.config.EstimatorConfig` that override ``config``'s
                (``Scorer(module, batch_size=8, samples=16)``).
        """
        from vtrans.estimators.runner import Runner

        unknown = sorted(set(settings) - SETTINGS)
        if unknown:
            raise TypeError(f"Scorer got unknown setting(s) {', '.join(unknown)}")
        self.config = replace(config or EstimatorConfig(), **settings)
        names = check_estimators(None if estimators is None else list(estimators), prior_of(module), self.config.aggregate)
        if template is not None:
            validate_template(template)
        if long_prompts not in ("truncate", "refuse"):
            raise ConfigError(f"long_prompts must be truncate or refuse, got {long_prompts!r}")
        self.module, self.names, self.template = module, names, template
        self._template_head = "" if template is None else template.split("{prefix}")[0].strip()
        self._warned_template = False
        self.batch_size, self.long_prompts, self.quiet = self.config.batch_size, long_prompts, quiet
        self.shard = distributed.current()  # the scorer deals out whole batches; each runs in one process
        self.runner = Runner(module.backbone, module, self.config, progress=False, shard=Shard())
        self.tokenizer = module.backbone.tokenizer
        context = getattr(module.backbone.model.config, "max_position_embeddings", None)
        self.context = int(context) if context else None
        max_new_tokens = self.config.max_new_tokens
        self.max_prompt_tokens = None if self.context is None else self.context - max_new_tokens
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {self.context} tokens"
            )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        estimators: list[str] | None = None,
        template: str | None = "ckpt",
        backbone=None,
        **options: Any,
    ) -> Scorer:
        """Load a checkpoint written by ``train.py fit`` (safely: see ``vtrans.latent.checkpoint``), or a
        folder written by ``LatentModel.save_pretrained``.

        The request (estimators, template, settings) is checked against what the checkpoint
        records before the base model loads.

        Args:
            path: the checkpoint file, or the folder.
            device: ``auto`` (where the ``backbone`` given is; else CUDA when available), ``cpu``,
                ``cuda`` or ``cuda:N`` (which moves a ``backbone`` given there).
            estimators: see :class:`Scorer`.
            template: ``ckpt`` (default): the template the latent was trained with, so that an
                input is an idiom's beginning as in training; ``None`` (or ``"none"``): inputs
                verbatim; or a template with one ``{prefix}`` field.
            backbone: the base model to score with, a ``vtrans.backbone.loading.Backbone`` (one made by
                ``Backbone.from_model`` from a model in memory, say); default: load the one the
                checkpoint names. Either way its fingerprint must be the checkpoint's.
            options: the other keyword arguments of :class:`Scorer`.

        Raises:
            vtrans.latent.checkpoint.CheckpointError: a missing, truncated, unsafe or foreign file, a
                checkpoint of another base model, or of a model in memory not given.
            vtrans.errors.ConfigError: an estimator or setting the checkpoint cannot score with.
        """
        from vtrans.backbone.loading import resolve_device
        from vtrans.latent import checkpoint

        ckpt = checkpoint.read(path)
        settings = {name: options.pop(name) for name in list(options) if name in SETTINGS}
        config = replace(options.pop("config", None) or EstimatorConfig(), **settings)
        estimators, template = check_request(ckpt, estimators, template, config)
        if backbone is not None and device == "auto":
            device = backbone.device  # a model in memory is scored where it is
        else:
            device = distributed.rank_device(resolve_device(device), distributed.current())
        with log.phase("loaded {path} and its base model {model}") as info:
            module = checkpoint.load(path, device=device, backbone=backbone, ckpt=ckpt)
            info.update(path=path, model=module.backbone.label)
        return cls(module, estimators, template, config=config, **options)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone=None,
        device: str = "auto",
        estimators: list[str] | None = None,
        template: str | None = "ckpt",
        **options: Any,
    ) -> Scorer:
        """Load a latent that ``LatentModel.save_pretrained`` wrote into ``directory``: the
        Hugging Face spelling of :meth:`from_checkpoint` (see there; ``template="ckpt"`` is the
        template the folder records)."""
        return cls.from_checkpoint(directory, device, estimators, template, backbone=backbone, **options)

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: Iterable[str], total: int | None = None) -> Iterator[dict]:
        """One record per prompt, in order, lazily (see the module docstring for their form).

        Args:
            prompts: any iterable of strings; it is read ``batch_size`` items at a time.
            total: how many there are, for the progress bar (default: ``len(prompts)`` if defined).
        """
        if isinstance(prompts, str | bytes):
            raise TypeError("score() takes an iterable of prompts: wrap a single prompt in a list")
        if total is None and hasattr(prompts, "__len__"):
            total = len(prompts)
        return self.score_lines((Line(p) for p in prompts), total)

    def score_lines(self, lines: Iterable[Line], total: int | None = None) -> Iterator[dict]:
        """Like :meth:`score`, for inputs that may already carry an error (lines of a file).

        Under a process group (``vtrans.estimators.distributed``) every rank reads the same input, the
        batches are dealt out round by round (batch ``b`` to rank ``b % world``), and every
        rank yields every record, in input order.
        """
        shard = self.shard
        bar = tqdm(
            total=total,
            desc="scoring",
            unit="prompt",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not log.bars_enabled(not self.quiet) or shard.rank != 0 or (total is not None and total <= self.batch_size),
        )
        scored = 0  # prompts scored so far: the index of the next one in the run (the seed of its draws)
        start = time.perf_counter()
        try:
            for batches in _batched(_batched(lines, self.batch_size), shard.world):
                done = {}
                for b, batch in enumerate(batches):
                    records, ready, truncated = self._prepare(batch, warn=b % shard.world == shard.rank)
                    if shard.mine(b):
                        done[b] = self._finish(batch, records, ready, truncated, scored)
                    scored += len(ready)
                for records in shard.merge(done):
                    yield from records
                bar.update(sum(len(batch) for batch in batches))
        finally:
            bar.close()
        log.log.info(f"scored {scored} prompts with {len(self.names)} estimators ({time.perf_counter() - start:.1f} s)")

    def _warn(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def _warn_template(self, line: Line) -> None:
        """Once per scorer: an input that already begins as the template does gets the template twice."""
        if not self._warned_template:
            self._warned_template = True
            where = f"line {line.line}" if line.line is not None else f"prompt {line.prompt[:40]!r}"
            self._warn(
                f"{where} already begins with the template's {self._template_head!r}, which is applied again; "
                "give idioms' beginnings, or --template none to score prompts verbatim"
            )

    def _problem(self, prompt: Any) -> str | None:
        if not isinstance(prompt, str):
            return f"prompt is {type(prompt).__name__}, not a string"
        if not prompt.strip():
            return "empty prompt" if not prompt else "blank prompt (only whitespace)"
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            return "prompt is not valid Unicode (it holds a lone surrogate)"
        return None

    def _n_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def truncate_left(self, text: str, budget: int) -> str:
        """The longest end of ``text`` (cut at a token boundary) that tokenises to at most ``budget`` tokens."""
        content = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=self.tokenizer.is_fast)
        ids = content["input_ids"]
        special = self._n_tokens([text])[0] - len(ids)
        keep = budget - special
        while keep >= 1:
            if self.tokenizer.is_fast:
                cut = content["offset_mapping"][len(ids) - keep][0]
                candidate = text[cut:]
            else:
                candidate = self.tokenizer.decode(ids[len(ids) - keep :])
            if candidate.strip() and self._n_tokens([candidate])[0] <= budget:
                return candidate
            keep -= 1
        return ""

    def _prepare(self, lines: list[Line], warn: bool = True) -> tuple[list[dict | None], list[tuple[int, str]], dict[int, int]]:
        """A batch's error records, the prompts ready to score (index in the batch, text) and the tokens cut from each."""
        records: list[dict | None] = [None] * len(lines)

        def error(i: int, message: str) -> None:
            line = lines[i]
            where = f"line {line.line}: " if line.line is not None and not message.startswith("line ") else ""
            records[i] = _with_fields({"prompt": line.prompt, "error": where + message}, line.fields)
            if line.line is not None:
                records[i]["line"] = line.line

        todo: list[tuple[int, str]] = []
        for i, line in enumerate(lines):
            problem = line.error or self._problem(line.prompt)
            if problem:
                error(i, problem)
            else:
                if warn and self._template_head and line.prompt.lstrip().startswith(self._template_head):
                    self._warn_template(line)
                text = line.prompt if self.template is None else self.template.format(prefix=line.prompt)
                todo.append((i, text))
        ready: list[tuple[int, str]] = []
        truncated: dict[int, int] = {}
        for (i, text), n in zip(todo, self._n_tokens([t for _, t in todo]) if todo else [], strict=True):
            budget = self.max_prompt_tokens
            if n == 0:
                error(i, "the prompt has no tokens")
            elif budget is not None and n > budget:
                if self.long_prompts == "refuse":
                    error(i, f"prompt of {n} tokens: the model's context of {self.context} holds {budget} "
                             f"prompt tokens and {self.context - budget} generated ones")
                    continue
                short = self.truncate_left(text, budget)
                if not short:
                    error(i, f"prompt of {n} tokens cannot be cut to {budget} tokens")
                    continue
                truncated[i] = n - self._n_tokens([short])[0]
                where = f"line {lines[i].line}" if lines[i].line is not None else f"prompt {text[:40]!r}..."
                if warn:
                    self._warn(f"{where}: {n} tokens, truncated from the left to the last {n - truncated[i]} "
                               f"(context {self.context}, {self.context - budget} kept for generation)")
                ready.append((i, short))
            else:
                ready.append((i, text))
        return records, ready, truncated

    def _finish(
        self, lines: list[Line], records: list[dict | None], ready: list[tuple[int, str]], truncated: dict[int, int], start: int
    ) -> list[dict]:
        """Score the ready prompts of a batch (``start``: how many were scored before them) and fill in their records."""
        if ready:
            completions, scores = self.runner.score_prompts([t for _, t in ready], self.names, start)
            for j, (i, _) in enumerate(ready):
                record = {
                    "prompt": lines[i].prompt,
                    "template": self.template,
                    "completion": completions[j].text.strip(),
                    "completion_word": completions[j].word,
                    "scores": {n: _number(scores[n][j]) for n in self.names if n in scores},
                }
                if i in truncated:
                    record["truncated"] = truncated[i]
                records[i] = _with_fields(record, lines[i].fields)
        if self.module.backbone.random_weights:  # every record of a model with random weights says so
            for record in records:
                record["random_weights"] = True
        return records  # type: ignore[return-value]


def _with_fields(record: dict, fields: dict | None) -> dict:
    """The input line's other fields, then the record's own (which win where a name is taken by both)."""
    return record if not fields else {**fields, **record}


# --------------------------------------------------------------------------- output


def dumps(record: dict) -> bytes:
    """One JSON line, UTF-8; ``\\u`` escapes where the text cannot be encoded (lone surrogates)."""
    try:
        return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def write_jsonl(records: Iterable[dict], stream: IO[bytes]) -> tuple[int, int]:
    """Write records as JSON lines, flushing each; returns (records written, error records)."""
    written = errors = 0
    for record in records:
        stream.write(dumps(record))
        stream.flush()
        written += 1
        errors += "error" in record
    return written, errors
