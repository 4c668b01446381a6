"""Completions of the base model (latent off): the labels every estimator is judged on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtrans.data import first_word


@dataclass(frozen=True)
class Completion:
    """What the model wrote after a prompt.

    Attributes:
        text: the generated text (special tokens dropped).
        word: the completion word: the first word of ``text``, normalised ('' if none).
        first_token: ŷ, the first generated token id (what the scored position predicts).
        word_ids: the generated tokens up to the end of the completion word (at least ŷ).
    """

    text: str
    word: str
    first_token: int
    word_ids: tuple[int, ...]


def word_token_count(tokenizer, ids: list[int], word: str) -> int:
    """The fewest leading tokens of ``ids`` whose text contains the whole first word."""
    if not word:
        return 1
    for n in range(1, len(ids) + 1):
        if first_word(tokenizer.decode(ids[:n], skip_special_tokens=True)) == word:
            return n
    return len(ids)


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
) -> list[Completion]:
    """Greedy (or sampled) completions, batched with left padding.

    ``max_new_tokens`` bounds how long a word may be; generation of a batch stops early once
    every item has ended its first word (end of sequence or a non-word character after it).
    """
    device = next(model.parameters()).device
    out: list[Completion] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the global state is left as it was
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            kwargs = dict(do_sample=do_sample, temperature=temperature) if do_sample else dict(do_sample=False)
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                top_k=None,
                top_p=None,
                **kwargs,
            )[:, enc["input_ids"].shape[1] :]
            for row in generated.tolist():
                ids = _strip_after_eos(row, tokenizer)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                word = first_word(text)
                n = word_token_count(tokenizer, ids, word) if ids else 0
                first = row[0]
                out.append(Completion(text, word, first, tuple(ids[: max(n, 1)]) if ids else (first,)))
            if progress is not None:
                progress(len(chunk))
    return out


def _strip_after_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def is_correct(completion: Completion, target: str) -> bool:
    """The item is correct iff the completion word equals the target word, normalised the same way."""
    return bool(completion.word) and completion.word == first_word(target)
