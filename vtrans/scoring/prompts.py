"""The prompt policy: what a scorer does to each input before it is scored.

* An empty or blank prompt (only whitespace), a value that is not a string, or a string that
  is not valid Unicode (a lone surrogate) is an error record.
* A prompt longer than the model's context is **truncated from the left** (its end, which
  predicts the completion, is kept): the model's context C (``max_position_embeddings``)
  must hold the prompt and ``max_new_tokens`` generated tokens, so the prompt keeps its last
  C − ``max_new_tokens`` tokens. A warning naming the input goes to stderr and the record
  carries ``"truncated": N``. With ``long_prompts="refuse"`` such a prompt is an error record
  instead. The template, when one is given, is applied before the length is measured.
* An input that already begins as the template does gets the template twice: a warning says
  so, once per scorer.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from tqdm.auto import tqdm

from vtrans.data import validate_template
from vtrans.errors import ConfigError
from vtrans.scoring.inputs import Line
from vtrans.scoring.records import _with_fields

LongPrompts = Literal["truncate", "refuse"]


class PromptPolicy:
    """The prompts of a batch of inputs, as the policy of the module docstring makes them.

    Args:
        backbone: the base model (its tokenizer, and its context: ``max_position_embeddings``).
        template: a template with one ``{prefix}`` field applied to every input, or ``None``.
        long_prompts: ``truncate`` (from the left, with a warning) or ``refuse`` (an error record).
        quiet: no warnings on stderr.
        max_new_tokens: the tokens generated after a prompt, which the context must hold too.

    Raises:
        DataError: a template without exactly one ``{prefix}`` field.
        ConfigError: another ``long_prompts``, or ``max_new_tokens`` that leaves no room for a prompt.
    """

    def __init__(self, backbone, template: str | None, long_prompts: LongPrompts, quiet: bool, max_new_tokens: int) -> None:
        if template is not None:
            validate_template(template)
        if long_prompts not in ("truncate", "refuse"):
            raise ConfigError(f"long_prompts must be truncate or refuse, got {long_prompts!r}")
        self.template, self.long_prompts, self.quiet = template, long_prompts, quiet
        self._template_head = "" if template is None else template.split("{prefix}")[0].strip()
        self._warned_template = False
        self.tokenizer = backbone.tokenizer
        context = getattr(backbone.model.config, "max_position_embeddings", None)
        self.context = int(context) if context else None
        self.max_prompt_tokens = None if self.context is None else self.context - max_new_tokens
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {self.context} tokens"
            )

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

    def prepare(self, lines: list[Line], warn: bool = True) -> tuple[list[dict | None], list[tuple[int, str]], dict[int, int]]:
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
