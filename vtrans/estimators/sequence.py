"""``sequence``: scores of the whole answer, every token the target mask marks, read off the shared forward.

The forward covers every answer token (the family needs ``whole_word``), and each score reduces
over the item's real slots only, whatever ``--aggregate`` says. With ŷ_1 … ŷ_T the answer's
tokens and log p_t = log p(ŷ_t | prompt, ŷ_<t) from ``log_softmax`` of the slot logits in
float32 (LM-Polygraph's names in brackets; each is higher when the answer is more likely wrong):

- ``sequence_nll`` = −Σ_t log p_t, the answer's surprise (MaximumSequenceProbability);
- ``perplexity`` = −(1/T) Σ_t log p_t, the log-perplexity (Perplexity);
- ``max_token_nll`` = max_t −log p_t, its least likely token;
- ``sequence_doubt`` = 1 − Π_t p_t, as ``−expm1(Σ_t log p_t)``;
- ``mean_token_entropy`` = (1/T) Σ_t H(p(· | prompt, ŷ_<t)) in nats (MeanTokenEntropy);
- ``rauq``: RAUQ, below.

**Precision near p = 1.** A token's log p_t is read as ``log1p(−q_t)``, q_t = 1 − p_t the mass
of every other token (as ``baselines.one_minus_p`` computes it), wherever q_t < 1/2, and straight
from ``log_softmax`` elsewhere. ``log_softmax`` alone rounds log p_t to 0 once p_t is within ~1e-7
of 1, and its absolute error grows with the logits' scale; from q_t, log p_t keeps its relative
precision down to the smallest float, so confident answers do not tie, and ``sequence_doubt`` of
a one-token answer is ``msp`` up to rounding. ``sequence_doubt`` still rounds at the other end: it
is 1.0 once Π_t p_t < 2⁻²⁴ (~6e-8), where 1 − Π_t p_t rounds to 1 in float32 and those items
tie; ``sequence_nll`` ranks them (it ranks every item as ``sequence_doubt`` does, the tied ones
apart).

**RAUQ** (Vazhentsev et al. 2025, arXiv 2505.20045, "Recurrent Attention-based Uncertainty
Quantification"), as LM-Polygraph's ``RAUQ`` estimator (``lm_polygraph/estimators/rauq.py``, with
the ``attention_all`` statistic of its ``GreedyProbsCalculator``) defines it with its defaults (a
base model, no entropy): α = 0.2, and the layers ℓ = ⌊L/3⌋ … ⌈2L/3⌉ (0-based, both ends included;
L blocks, the upper end kept below L). Its attention to the previous token, a^{ℓ,h}_t for
t ≥ 2, is ``attention_all[ℓH + h, t, t − 1]``: the weight that ``generate``'s step for ŷ_t (its
one query row, which feeds ŷ_{t−1}) puts on ŷ_{t−1}, its last key. In the shared forward that row
is the one of the position predicting ŷ_t, and the weight is its weight on itself,
``attentions[ℓ][b, h, q, q]`` at q = T' − 1 − N + slot (T' the forward's width), not the weight of
ŷ_t's own position on ŷ_{t−1}, one row later. For each layer ℓ:

- the head h_ℓ = argmax_h (1/(T−1)) Σ_{t≥2} a^{ℓ,h}_t, chosen per item (the first on a tie);
- the recurrent confidence c_1 = p_1 and c_t = α p_t + (1 − α) a^{ℓ,h_ℓ}_t c_{t−1}: ŷ_1, whose
  previous token is the prompt's last one, is not read through any attention weight, as in
  LM-Polygraph and the paper's Algorithm 1; its c is its probability;
- u_ℓ = 1 − (1/T) Σ_t log c_t;

and ``rauq`` = max_ℓ u_ℓ. The paper's Eq. (3) writes u_ℓ without the leading 1; LM-Polygraph adds
it; the two rank items alike. c_t is carried in log space (``logaddexp``), so a weight of 0 or a
tiny p_t gives a finite log c_t. With one answer token, ``rauq`` = 1 + ``sequence_nll``. The head
means are float32 (LM-Polygraph's float64): two heads within float32 rounding of each other may be
chosen differently.

An item with no answer token gets NaN in every score (never in a run: a completion has at least
ŷ). The attention weights need eager attention: ``rauq`` needs ``attentions`` and is read only
when the forward kept them.

Every name is read off the one shared forward, with no pass of its own and no fit (``rauq`` off
its attention weights, the forward in eager attention): each is as cheap as ``msp``, so the family
is among the references, the cheap baselines the best of which every estimator is paired against;
the sequence-level likelihoods are the bar an answer of several tokens calls for, which ŷ's own
``msp`` is not. It is not among ``vtrans score``'s defaults, whose records it would change.
"""

from __future__ import annotations

import math

import torch

from vtrans.backbone.tokens import Encoded, aggregate, shift_positions
from vtrans.estimators.base import Context, Family, Forward, Shown

ALPHA = 0.2
"""RAUQ's weight of the current token's probability against the previous confidence: LM-Polygraph's
default for a base model, and the paper's for every task but summarisation (there 0)."""


def token_log_probs(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) (...,) from a ``log_softmax`` (..., V): from the other tokens' mass q = 1 − p
    (``log1p(−q)``) where q < 1/2, which keeps its precision near p = 1, else the entry itself."""
    index = ids.unsqueeze(-1)
    chosen = logp.gather(-1, index).squeeze(-1)
    log_q = torch.logsumexp(logp.scatter(-1, index, float("-inf")), -1)  # log(1 − p)
    return torch.where(log_q < -math.log(2.0), torch.log1p(-log_q.exp()), chosen)


def rauq_layers(n_layers: int) -> range:
    """RAUQ's layers of a model of ``n_layers`` blocks: ⌊L/3⌋ … ⌈2L/3⌉, at most L − 1 (0-based)."""
    return range(n_layers // 3, min(n_layers, -(-2 * n_layers // 3) + 1))


def previous_token_attention(attentions: tuple[torch.Tensor, ...], enc: Encoded, layers: range):
    """(B, len(layers), H, N) float32: for each answer slot, the weight its predicting position puts
    on itself (the token it was fed, ŷ of the slot before), in each layer of ``layers`` and head."""
    width, n = enc.input_ids.shape[1], enc.targets.shape[1]
    positions = torch.arange(width - 1 - n, width - 1, device=attentions[0].device)  # slot j predicted there
    return torch.stack([attentions[layer][:, :, positions, positions].float() for layer in layers], 1)


def rauq(attentions: tuple[torch.Tensor, ...], log_p: torch.Tensor, enc: Encoded, alpha: float = ALPHA):
    """RAUQ (B,) from the forward's attention weights (each (B, H, T, T)) and the answer tokens'
    log-probabilities (B, N); see the module's docstring."""
    mask = enc.target_mask.to(log_p.device)
    first = enc.first_slot.to(log_p.device)
    n = mask.sum(1)  # (B,)
    slots = torch.arange(mask.shape[1], device=log_p.device)
    later = mask & (slots.unsqueeze(0) > first.unsqueeze(1))  # (B, N): the tokens after ŷ_1
    layers = rauq_layers(len(attentions))
    prev = previous_token_attention(attentions, enc, layers).to(log_p.device)  # (B, ℓ, H, N)
    weights = later[:, None, None, :]
    mean = torch.where(weights, prev, 0.0).sum(-1) / (n - 1).clamp(min=1)[:, None, None]  # (B, ℓ, H)
    head = mean.argmax(-1)  # (B, ℓ)
    chosen = prev.gather(2, head[:, :, None, None].expand(-1, -1, 1, prev.shape[-1])).squeeze(2)  # (B, ℓ, N)
    log_alpha, log_rest = math.log(alpha), math.log1p(-alpha)
    log_c = torch.zeros(chosen.shape[:2], device=log_p.device)  # (B, ℓ)
    total = torch.zeros_like(log_c)
    for j in range(mask.shape[1]):
        lp = log_p[:, j].unsqueeze(1)  # (B, 1)
        step = torch.logaddexp(log_alpha + lp, log_rest + torch.log(chosen[:, :, j]) + log_c)
        log_c = torch.where((slots[j] == first).unsqueeze(1), lp.expand_as(log_c), log_c)
        log_c = torch.where(later[:, j].unsqueeze(1), step, log_c)
        total = total + torch.where(mask[:, j].unsqueeze(1), log_c, 0.0)
    per_layer = 1 - total / n.clamp(min=1).unsqueeze(1)
    return per_layer.amax(1)


def slot_values(forward: Forward) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) each: every answer slot's log p(ŷ_t) (:func:`token_log_probs`) and the entropy of its
    next-token distribution, from one ``log_softmax`` of the slot logits."""
    logp = torch.log_softmax(forward.logits.float(), -1)  # (B, N, V)
    return token_log_probs(logp, forward.enc.targets.to(logp.device)), -(logp.exp() * logp).sum(-1)


def from_forward(forward: Forward, values: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every score of the family (B,) from the slot logits (or their :func:`slot_values`, where
    computed already), ``rauq`` where the forward kept its attention weights."""
    enc = forward.enc
    mask = enc.target_mask.to(forward.logits.device)
    log_p, entropy = values if values is not None else slot_values(forward)
    nll = torch.where(mask, -log_p, 0.0)
    total = nll.sum(1)
    out = {
        "sequence_nll": total,
        "perplexity": aggregate(nll, enc, "mean"),
        "max_token_nll": aggregate(nll, enc, "max"),
        "sequence_doubt": -torch.expm1(-total),
        "mean_token_entropy": aggregate(torch.where(mask, entropy, 0.0), enc, "mean"),
    }
    attentions = forward.attentions
    if attentions and attentions[0] is not None:
        out["rauq"] = rauq(attentions, torch.where(mask, log_p, 0.0), enc)
    empty = mask.sum(1) == 0
    return {name: torch.where(empty, float("nan"), value) for name, value in out.items()}


def per_token(values: torch.Tensor, enc: Encoded, width: int) -> torch.Tensor:
    """(B, width) of per-slot values (B, N): each item's answer tokens from index 0, NaN past its end."""
    n = enc.target_mask.sum(1).to(values.device)  # (B,)
    out = shift_positions(values, enc.targets.shape[1] - n, width, 1)
    return out.masked_fill(torch.arange(width, device=values.device).unsqueeze(0) >= n.unsqueeze(1), float("nan"))


def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    """The family's scores, and per answer token its −log p (``token_nll``) and its next-token
    distribution's entropy (``token_entropy``), written into the rows."""
    log_p, entropy = values = slot_values(forward)
    out = from_forward(forward, values)
    width = context.config.max_new_tokens * context.config.answer_words
    out["token_nll"] = per_token(-log_p, forward.enc, width)
    out["token_entropy"] = per_token(entropy, forward.enc, width)
    return out


FAMILY = Family(
    "sequence",
    {
        "sequence_nll": "−Σ log p(ŷ_t | ŷ_<t) over the answer's tokens: its surprise as a whole",
        "perplexity": "−(1/T) Σ log p(ŷ_t | ŷ_<t): the answer's log-perplexity",
        "max_token_nll": "max over the answer's tokens of −log p(ŷ_t | ŷ_<t): its least likely token",
        "sequence_doubt": "1 − Π p(ŷ_t | ŷ_<t): the model's doubt about the whole answer",
        "mean_token_entropy": "mean over the answer's tokens of the entropy of the next-token distribution",
        "rauq": "RAUQ: confidence carried token to token through the head most attentive to the previous token",
    },
    read,
    needs=frozenset({"whole_word"}),
    name_needs={"rauq": frozenset({"attentions"})},
    tokens=("token_nll", "token_entropy"),
    shown=Shown(
        default_score=False,
        reference=True,
        prose={
            "reference": "the sequence-level scores (`sequence_nll`, `perplexity`, `max_token_nll`, "
            "`sequence_doubt`, `mean_token_entropy`, `rauq`)",
        },
    ),
)
