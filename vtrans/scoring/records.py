"""The records a scorer yields, and their JSON lines.

**Records.** One per input, in input order:
``{"prompt": str, "template": str | None, "completion": str, "completion_word": str,
"scores": {NAME: float | None}, "p_wrong": float}`` (``None`` where a score is not finite; ``template`` the one
applied, ``None`` for a prompt scored verbatim; ``completion_word`` the first word of the
completion, normalised as ``vtrans evaluate`` writes it; ``p_wrong`` the probability that the
completion is wrong, from the calibration the latent carries (``vtrans.latent.calibration``), and
left out, with a warning at load, for a latent that carries none), with ``"tokens": {"answer": [str],
KEY: [float]}`` added where a family that writes per-token values ran (the ``sequence`` family's
``token_nll`` and ``token_entropy``, one value per token of the answer), ``"truncated": N`` added when N
tokens were cut from the prompt's left, and ``"random_weights": true`` in every record when the base
model's weights are random (``random:NAME``). An input that cannot be scored gives
``{"prompt": ..., "error": "..."}`` (plus ``"line": N`` when it came from a file) and the other
inputs are scored as usual. The other fields of a JSONL input line (an ``"id"``, say) are
passed through unchanged into its record, error or not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING

import numpy as np
import torch

from vtrans.estimators import registry
from vtrans.scoring.inputs import Line

if TYPE_CHECKING:
    from vtrans.backbone.generate import Completion


def _number(value: torch.Tensor | float) -> float | None:
    x = float(value)
    return x if x == x and abs(x) != float("inf") else None


def scored_records(
    lines: list[Line],
    records: list[dict | None],
    ready: list[tuple[int, str]],
    truncated: dict[int, int],
    completions: Sequence[Completion],
    scores: dict[str, torch.Tensor],
    names: list[str],
    template: str | None,
    random_weights: bool,
    p_wrong: np.ndarray | None = None,
    answer_tokens: Sequence[list[str]] | None = None,
) -> list[dict]:
    """A batch's records: those of the ``ready`` prompts (index in the batch, text) filled in
    from their completions and scores (and ``p_wrong``, one per ready prompt, where the latent
    carries a calibration), beside the error records already there."""
    for j, (i, _) in enumerate(ready):
        record = {
            "prompt": lines[i].prompt,
            "template": template,
            "completion": completions[j].text.strip(),
            "completion_word": completions[j].word,
            "scores": {n: _number(scores[n][j]) for n in names if n in scores},
        }
        if p_wrong is not None:
            record["p_wrong"] = _number(p_wrong[j])
        per_token = [key for key in registry.tokens() if key in scores]
        if per_token and answer_tokens is not None:
            record["tokens"] = {"answer": answer_tokens[j]}
            record["tokens"].update({key: [_number(v) for v in registry.per_item(key, scores[key][j])] for key in per_token})
        if i in truncated:
            record["truncated"] = truncated[i]
        records[i] = _with_fields(record, lines[i].fields)
    if random_weights:  # every record of a model with random weights says so
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
