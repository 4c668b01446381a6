"""Completions of the base model (latent off): the labels every estimator is judged on.

A completion never contains a token that is not text (``vtrans.backbones.non_text_ids``: Gemma
3's image markers, rows of a head past the tokenizer's vocabulary): generation suppresses them.
The logits it keeps are the model's own, before that.

``vtrans.runner`` may ask :func:`generate_batch` to keep what Hugging Face's ``generate``
computes on the way (the logits of each step, every layer's states, the attention weights, the
keys and values): the forward of the prompt and its completion that every estimator reads then
comes out of the completion itself instead of a second pass (``vtrans.estimators.base``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from vtrans.backbone import sample_tree
from vtrans.backbone.architectures import non_text_ids
from vtrans.backbone.attention import full_cache
from vtrans.data import first_words, words_final


@dataclass(frozen=True)
class Completion:
    """What the model wrote after a prompt.

    Attributes:
        text: the generated text (special tokens dropped).
        word: the answer: the first word of ``text`` (its first K words with answers of K words,
            joined by one space), normalised ('' if none).
        first_token: ŷ, the first generated token id (what the scored position predicts).
        word_ids: the generated tokens up to the end of the answer (at least ŷ).
    """

    text: str
    word: str
    first_token: int
    word_ids: tuple[int, ...]


@dataclass
class Generation:
    """What ``generate`` computed while it completed a batch, in its own layout.

    The prompts are left-padded to width W and the G generated tokens follow, so generated
    token j sits at position W + j. Every token but the last generated one was fed to the
    model; :meth:`feed_last` feeds that one too, when its states are wanted.

    Attributes:
        prompt_mask: (B, W) the prompts' attention mask.
        sequences: (B, W + G) prompts and generated tokens.
        logits: (B, G, V) the raw logits that chose each generated token, when kept.
        hidden_states: the L+1 residual-stream states (B, P, C) of the P positions fed, when kept.
        attentions: the L attention-weight tensors (B, H, P, P), when kept.
        cache: the keys and values of the P positions fed, kept with any of the above (what
            :meth:`feed_last` continues from).
    """

    prompt_mask: torch.Tensor
    sequences: torch.Tensor
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cache: object = None

    @property
    def prompt_width(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def fed(self) -> int:
        """P, the positions whose states exist."""
        return self.sequences.shape[1] - 1

    @torch.no_grad()
    def feed_last(self, model) -> None:
        """Run the last generated token through the model with the cache, so that its states exist too."""
        mask = torch.cat([self.prompt_mask, torch.ones_like(self.sequences[:, self.prompt_width :])], 1)
        out = model(
            input_ids=self.sequences[:, -1:],
            attention_mask=mask,
            position_ids=mask.sum(1, keepdim=True) - 1,
            cache=self.cache,
            use_cache=True,
            output_hidden_states=self.hidden_states is not None,
            output_attentions=self.attentions is not None,
        )
        if self.hidden_states is not None:
            self.hidden_states = tuple(torch.cat(pair, 1) for pair in zip(self.hidden_states, out.hidden_states, strict=True))
        if self.attentions is not None:
            self.attentions = _attention_rows(self.attentions, out.attentions)
        self.cache = out.cache
        self.sequences = torch.cat([self.sequences, self.sequences[:, -1:]], 1)  # one more position fed


def word_token_count(tokenizer, ids: list[int], word: str, answer_words: int = 1) -> int:
    """The fewest leading tokens of ``ids`` whose text contains the whole answer ``word`` (its first
    ``answer_words`` words)."""
    if not word:
        return 1
    for n in range(1, len(ids) + 1):
        if first_words(tokenizer.decode(ids[:n], skip_special_tokens=True), answer_words) == word:
            return n
    return len(ids)


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 6,
    do_sample: bool = False,
    temperature: float = 1.0,
    logits: bool = False,
    hidden_states: bool = False,
    attentions: bool = False,
    cache: bool = False,
    copies: int = 1,
    words_only: bool = False,
    tree: bool = True,
    answer_words: int = 1,
) -> tuple[list[Completion], Generation]:
    """One batch of greedy (or sampled, from the global random state) completions, left-padded.

    Tokens that are not text are never generated (:func:`vtrans.backbones.non_text_ids`).

    Args:
        logits, hidden_states, attentions, cache: keep the logits of each step, every layer's states, the attention weights
            (the model must run eager attention) or the keys and values of the positions fed
            (kept with either of the others too).
        copies: complete each prompt this many times (rows ``i·copies … (i+1)·copies − 1`` are
            prompt i's): what ``prompts`` repeated that many times would give, each copy drawn
            on its own, but the prompts' tokens but the last are run once per prompt and their
            keys and values shared by the copies (:func:`_prompt_cache`); sampled copies
            run each distinct prefix once (:mod:`vtrans.backbone.sample_tree`: ``generate``'s
            draws, its steps on fewer rows).
        words_only: only the completion words are wanted: a row stops once its word is final
            (:func:`vtrans.data.word_is_final`), the batch once every row has; ``text`` then ends
            soon after the word. The draws up to there are the ones a full-length call makes.
        tree: sampled copies run each distinct prefix once (:mod:`vtrans.backbone.sample_tree`);
            False runs ``generate``'s own loop over every row (the same draws; for comparison).
        answer_words: K, the words of the answer: ``Completion.word`` is the first K, and
            ``words_only`` stops a row once its K-th word is final.

    Returns:
        the completions and the :class:`Generation` they came from.
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    sampling = dict(do_sample=True, temperature=temperature) if do_sample else dict(do_sample=False)
    suppressed = non_text_ids(model, tokenizer)
    shared = copies > 1 and not (logits or hidden_states or attentions or cache) and enc["input_ids"].shape[1] > 1
    stop = _WordFinal(tokenizer, enc["input_ids"].shape[1], answer_words) if words_only else None
    kv = _prompt_cache(model, enc) if shared else full_cache()
    if tree and shared and do_sample and sample_tree.applies(model):  # generate's draws, each distinct prefix run once
        width = enc["input_ids"].shape[1]
        sequences = sample_tree.sample(
            model,
            kv,
            enc["input_ids"],
            enc["attention_mask"],
            copies,
            max_new_tokens,
            temperature,
            tokenizer.pad_token_id,
            suppressed,
            finished=None if stop is None else stop.words_final,
        )
        generation = Generation(enc["attention_mask"].repeat_interleave(copies, 0), sequences)
        return [_completion(tokenizer, row, answer_words) for row in sequences[:, width:].tolist()], generation
    if shared:
        kv.batch_repeat_interleave(copies)  # each prompt's keys and values, shared by its copies
    if copies > 1:
        enc = {key: value.repeat_interleave(copies, 0) for key, value in enc.items()}
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        top_k=None,
        top_p=None,
        return_dict_in_generate=True,
        output_logits=logits,
        output_hidden_states=hidden_states,
        output_attentions=attentions,
        use_cache=True,
        cache=kv,  # every position's keys, sliding-window blocks' too: the forward is laid out from them
        suppress_tokens=suppressed or None,  # their logits -inf when choosing; output_logits keeps the raw ones
        stopping_criteria=StoppingCriteriaList([stop]) if stop is not None else None,
        **sampling,
    )
    width = enc["input_ids"].shape[1]
    generation = Generation(
        enc["attention_mask"],
        out.sequences,
        torch.stack(out.logits, 1) if logits else None,
        tuple(torch.cat(layer, 1) for layer in zip(*out.hidden_states, strict=True)) if hidden_states else None,
        _attention_rows(*out.attentions) if attentions else None,
        out.cache if cache or hidden_states or attentions else None,
    )
    return [_completion(tokenizer, row, answer_words) for row in out.sequences[:, width:].tolist()], generation


class _WordFinal(StoppingCriteria):
    """Done for a row whose answer of K words is final (:func:`vtrans.data.words_final`)."""

    def __init__(self, tokenizer, width: int, answer_words: int = 1) -> None:
        self.tokenizer, self.width, self.answer_words = tokenizer, width, answer_words

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.words_final(input_ids[:, self.width :])

    def words_final(self, generated: torch.Tensor) -> torch.BoolTensor:
        """Of rows of generated tokens, (n, j): whose completion word is final."""
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        final = [words_final(t, self.answer_words) for t in texts]
        return torch.tensor(final, dtype=torch.bool, device=generated.device)


def _prompt_cache(model, enc) -> DynamicCache:
    """The keys and values of every prompt token but the last (a column every row has), one row per
    prompt: ``generate`` (or the sample tree) then runs the last column and the new tokens only.
    The positions are the ones ``generate`` gives a left-padded row."""
    ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    kv = full_cache()
    model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv, use_cache=True)
    return kv


def _attention_rows(first: tuple[torch.Tensor, ...], *steps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Per layer, the (B, H, P, P) weights of a prefill's square block followed by one row per later step (zeros past each row's keys)."""
    width = first[0].shape[-1] + len(steps)
    pad = torch.nn.functional.pad
    return tuple(
        torch.cat([pad(a, (0, width - a.shape[-1])) for a in (layer[0], *layer[1:])], 2)
        for layer in zip(first, *steps, strict=True)
    )


def _completion(tokenizer, row: list[int], answer_words: int = 1) -> Completion:
    ids = _strip_after_eos(row, tokenizer)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    word = first_words(text, answer_words)
    n = word_token_count(tokenizer, ids, word, answer_words) if ids else 0
    return Completion(text, word, row[0], tuple(ids[: max(n, 1)]) if ids else (row[0],))


@torch.no_grad()
def complete(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 6,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress=None,
    copies: int = 1,
    words_only: bool = False,
    tree: bool = True,
    answer_words: int = 1,
) -> list[Completion]:
    """Greedy (or sampled) completions, batched with left padding.

    ``max_new_tokens`` bounds how long a word may be: an answer of K words gets K times as many
    tokens, and one still going after that is cut there. Sampled completions draw from a generator seeded ``seed``; the global random
    state is left as it was. With ``copies`` c, each prompt is completed c times (c consecutive
    completions), as ``prompts`` repeated c times each would be with ``batch_size · c`` rows a
    batch, each prompt's tokens run once; ``words_only``, ``tree`` and ``answer_words``: see
    :func:`generate_batch`.
    """
    device = next(model.parameters()).device
    out: list[Completion] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out += generate_batch(
                model, tokenizer, chunk, max_new_tokens * answer_words, do_sample, temperature, copies=copies,
                words_only=words_only, tree=tree, answer_words=answer_words,
            )[0]
            if progress is not None:
                progress(len(chunk))
    return out


def _strip_after_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def is_correct(completion: Completion, target: str, answer_words: int = 1) -> bool:
    """The item is correct iff the completion's first K words equal the target's, normalised the same way."""
    return bool(completion.word) and completion.word == first_words(target, answer_words)
