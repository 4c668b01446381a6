"""Sampled-word agreement: LM-Polygraph's black-box baseline, which needs no latent and no internals.

K completions are sampled per prompt (temperature ``temperature``, a seed of their own) and
compared with the greedy completion *as words* (:func:`vtrans.data.first_word`, as
``Completion.word``), so "Cake." and "cake" agree; with answers of K words (``answer_words``) the
K-word answers are compared whole, so "blue moon" and "Blue moon." agree and "blue sky" does not:

- ``sample_disagreement`` = 1 − (share of the K sampled words equal to the greedy word);
- ``sample_word_entropy`` = entropy in nats of the distribution of the K sampled words;
- ``cocoa`` = −log p(ŷ) × ``sample_disagreement``: CoCoA (Vashurin et al., arXiv 2502.04964), the
  model's confidence in its answer times its consistency with the samples, in the form its paper
  calls CoCoA_MSP, U = u(y*) · (1/K) Σ_k (1 − s(y*, y_k)), with u(y*) = −log p(y*) read off the
  shared forward (over the completion's tokens as ``--aggregate`` says: the first one by default,
  as ``msp``) and the similarity s of two one-word answers 1 when they are the same word, 0 when
  not. It is 0 whenever every sample agrees with the greedy word.

All are higher when the model is less sure. A completion with no word counts as the word ``""``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from vtrans.backbone.generate import Completion, complete
from vtrans.backbone.tokens import aggregate
from vtrans.data import first_words
from vtrans.estimators.base import Context, Family, Forward, Shown, item_seed


def sample_seed(seed: int) -> int:
    """The seed of the K samples: apart from ``seed``, which a sampled (non-greedy) completion uses."""
    return (seed * 1_000_003 + 7_919) % 2**31


def word_scores(
    greedy: Sequence[str], samples: Sequence[Sequence[str]], answer_words: int = 1
) -> dict[str, torch.Tensor]:
    """Agreement of sampled words with the greedy word, per prompt.

    Args:
        greedy: the greedy completion of each prompt (a word or text; its first word is compared).
        samples: for each prompt, its K sampled completions (words or texts).

    Returns:
        ``sample_disagreement`` and ``sample_word_entropy``, each (n,).
    """
    disagreement, entropy = [], []
    for g, texts in zip(greedy, samples, strict=True):
        words = [first_words(t, answer_words) for t in texts]
        counts = Counter(words)
        k = len(words)
        disagreement.append(1 - counts[first_words(g, answer_words)] / k)
        entropy.append(sum(c / k * math.log(k / c) for c in counts.values()))
    return {
        "sample_disagreement": torch.tensor(disagreement, dtype=torch.float32),
        "sample_word_entropy": torch.tensor(entropy, dtype=torch.float32),
    }


def scores(
    model,
    tokenizer,
    prompts: list[str],
    greedy: list[Completion],
    k: int = 10,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 6,
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
    answer_words: int = 1,
) -> dict[str, torch.Tensor]:
    """Sample K completions per prompt and score them against the greedy ones (:func:`word_scores`).

    Each prompt is completed K times and a ``generate`` call takes ``batch_size`` whole prompts
    (``batch_size · k`` sequences). The prompt is run once and its keys and values shared by its K
    samples, so the K samples cost K-times-wider decoding steps, not K prompts' forwards; and the
    decoding stops once every sample's word is final. A batch's draws are those of its prompts
    repeated K times. The global random state is
    left as it was (see ``vtrans.generate.complete``).

    Args:
        model, tokenizer: the base model (latent off) and its tokenizer.
        prompts: the prompts, as completed greedily.
        greedy: their completions, one per prompt.
        k: samples per prompt.
        temperature: sampling temperature.
        seed: seed of the samples (see :func:`sample_seed`).
        max_new_tokens: generation budget of a completion word.
        batch_size: prompts per ``generate`` call.
        progress: called with the number of prompts done after each batch.
        answer_words: K: whole answers of K words are compared (:func:`vtrans.data.first_words`).
    """
    sampled = complete(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        copies=k,
        words_only=True,
        answer_words=answer_words,
    )
    words = [[c.word for c in sampled[i * k : (i + 1) * k]] for i in range(len(prompts))]
    return word_scores([c.word for c in greedy], words, answer_words)


def cocoa(nll: torch.Tensor, disagreement: torch.Tensor) -> torch.Tensor:
    """CoCoA_MSP of each item: its −log p(ŷ) (n,) times its ``sample_disagreement`` (n,)."""
    return nll.float() * disagreement.float()


def answer_nll(forward: Forward, how: str = "first") -> torch.Tensor:
    """−log p(ŷ) of each item's completion tokens from the shared forward, (B,), reduced by ``how``."""
    logits = forward.logits.float()  # (B, N, V)
    nll = logits.logsumexp(-1) - logits.gather(-1, forward.enc.targets.unsqueeze(-1)).squeeze(-1)  # (B, N), as the lens reads its last layer
    return aggregate(nll, forward.enc, how).cpu()


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    """K samples per prompt of the batch, from a seed of the batch's first item (apart from the
    completions' seed); ``cocoa`` reads ŷ's probability off the shared forward, there only when it runs."""
    cfg = context.config
    result = scores(
        context.model,
        context.tokenizer,
        context.prompts,
        context.completions,
        k=cfg.agreement_samples,
        temperature=cfg.agreement_temperature,
        seed=sample_seed(item_seed(cfg.seed, context.indices[0])),
        max_new_tokens=cfg.max_new_tokens,
        batch_size=len(context.prompts),
        answer_words=cfg.answer_words,
    )
    if forward is not None:  # a run of the agreement alone has no forward, and no cocoa
        result["cocoa"] = cocoa(answer_nll(forward, cfg.aggregate), result["sample_disagreement"])
    return result


FAMILY = Family(
    "sampling",
    {
        "sample_disagreement": "share of K sampled completion words that differ from the greedy one",
        "sample_word_entropy": "entropy of the K sampled completion words",
        "cocoa": "−log p(ŷ) × sample_disagreement: the answer's improbability times its disagreement with the samples (CoCoA)",
    },
    read,
    extra_passes=True,
    reads_forward=frozenset({"cocoa"}),
    shown=Shown(
        default_score=False,
        reference=True,
        prose={
            "cost": "the sampled completions",
            "reference": "the sampled-word agreement (`sample_disagreement`, `sample_word_entropy`, `cocoa`)",
        },
    ),
)
