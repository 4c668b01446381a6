"""Sampled completions, K per prompt, in which each distinct prefix runs through the model once.

K samples of one prompt share their prompt, and at temperature 1 most of them share their first
tokens too; once a sample's word is final its later tokens are never read. Hugging Face's
``generate`` still runs every row at every step until the last row of the batch stops. Here a
step runs one row per distinct (prompt, tokens so far) among the rows still going: the keys and
values of those rows are gathered from their parents' (:meth:`DynamicCache.reorder_cache`) and
each row's next-token distribution is read off its prefix's.

The draws are ``generate``'s own: each step builds the (rows × vocabulary) probabilities that
``generate`` builds (its suppressed tokens at −inf, divided by the temperature, a softmax) and
draws from them with one ``torch.multinomial`` call from the global random state. ``multinomial``
consumes the same random numbers for a row whatever the other rows hold (one sample: an
exponential per entry, then an argmax), so a finished row, whose draw is discarded as
``generate`` discards it, may hold any distribution. The steps stop where ``generate``'s do: every
row finished (its word final, or an end-of-sequence token) or the token budget spent. A row's
logits come from a forward of fewer rows than ``generate`` runs, which can change their last bits
(the matrix kernels a batch size picks); a draw moves only when its uniform falls within that
rounding of a boundary between two tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache

# generation settings that would add a logits processor this path does not apply, each with the
# value that adds none
NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "renormalize_logits": (None, False),
    "watermarking_config": (None,),
}


def applies(model) -> bool:
    """Whether the model's generation settings add nothing to what this path reproduces (suppressed
    tokens, temperature, end-of-sequence tokens): else ``generate`` is used."""
    config = model.generation_config
    return all(getattr(config, key, None) in neutral for key, neutral in NEUTRAL.items())


def eos_ids(model) -> list[int]:
    """The end-of-sequence ids ``generate`` stops a row on (none when the config names none)."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def sample(
    model,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    copies: int,
    max_new_tokens: int,
    temperature: float,
    pad_token_id: int,
    suppressed: Sequence[int] = (),
    finished: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``copies`` sampled continuations of each left-padded prompt, (B · copies, W + G).

    Rows ``i·copies … (i+1)·copies − 1`` are prompt i's; a row's tokens after it finished are
    ``pad_token_id``, as ``generate`` writes them.

    Args:
        cache: the keys and values of every prompt column but the last, one row per prompt
            (``vtrans.backbone.generate``'s prompt cache); the steps extend and regroup it.
        finished: given the generated tokens of the rows still going, (n, j), which of them are
            done (a stopping criterion: the completion word is final); an end-of-sequence token
            ends a row too.
    """
    if not input_ids.shape[1] > 1:
        raise ValueError("a prompt of two tokens at least: all but the last run once, before the steps")
    device = input_ids.device
    rows = input_ids.shape[0] * copies
    eos = torch.tensor(eos_ids(model), dtype=torch.long, device=device)
    # the rows the next step runs: one per distinct prefix, each with its last token, mask and position
    # (a left-padded prompt's last column is a token: its position is the prompt's length − 1)
    feed, mask = input_ids[:, -1:], attention_mask
    position = attention_mask.long().sum(-1, keepdim=True) - 1
    source = torch.arange(rows, device=device) // copies  # each row's prefix among them
    going = torch.ones(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # the rows going, as indices
    blocked = torch.tensor(list(suppressed), dtype=torch.long, device=device)
    steps: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=feed, attention_mask=mask, position_ids=position, cache=cache, use_cache=True).logits
        scores = logits[:, -1].float()
        if len(blocked):
            scores[:, blocked] = -torch.inf
        if temperature != 1.0:
            scores = scores / temperature
        probs = torch.softmax(scores, dim=-1).index_select(0, source)  # a finished row reads prefix 0's
        drawn = torch.multinomial(probs, num_samples=1).squeeze(1)
        drawn = torch.where(going, drawn, torch.full_like(drawn, pad_token_id))
        steps.append(drawn)
        done = torch.isin(drawn[live], eos)
        if finished is not None:
            done |= finished(torch.stack(steps, 1)[live]).to(device)
        going[live[done]] = False
        live = live[~done]
        if not len(live):
            break
        vocab = probs.shape[1]
        prefixes, source_live = torch.unique(source[live] * vocab + drawn[live], return_inverse=True)
        parents, tokens = prefixes // vocab, prefixes % vocab
        cache.reorder_cache(parents)
        feed = tokens[:, None]
        mask = torch.cat([mask.index_select(0, parents), torch.ones_like(mask[parents, :1])], 1)
        position = position.index_select(0, parents) + 1
        source = torch.zeros(rows, dtype=torch.long, device=device)
        source[live] = source_live
    return torch.cat([input_ids.repeat_interleave(copies, 0), torch.stack(steps, 1)], 1)
