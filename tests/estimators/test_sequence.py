"""The sequence-level family (``vtrans.estimators.sequence``): every score against a token-by-token
reference in float64, the one-token case against ``msp``, scores that must rise, RAUQ by hand on
constructed attention weights and against its definition on ``generate``'s own attention steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import Encoded, encode
from vtrans.config import EstimatorConfig
from vtrans.estimators import baselines, registry, sequence
from vtrans.estimators.base import Forward, run_forward
from vtrans.estimators.plan import Plan
from vtrans.estimators.runner import Runner

NAMES = ["sequence_nll", "perplexity", "max_token_nll", "sequence_doubt", "mean_token_entropy", "rauq"]
PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: kill two birds with one", "Complete the idiom: the"]
LENGTHS = [3, 1, 2]  # answer tokens per prompt: the batch is left-padded and its slots partly padding


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def backbone(request) -> Backbone:
    return Backbone(request.param)  # eager attention: the forward returns its weights


def _encoded(targets: list[list[int]], width: int) -> Encoded:
    """A batch whose prompts are ``width − len(target)`` dummy tokens (the ids are never read)."""
    n_max = max(map(len, targets))
    b = len(targets)
    ids = torch.ones((b, width), dtype=torch.long)
    tgt = torch.zeros((b, n_max), dtype=torch.long)
    mask = torch.zeros((b, n_max), dtype=torch.bool)
    for i, t in enumerate(targets):
        tgt[i, n_max - len(t) :] = torch.tensor(t)
        mask[i, n_max - len(t) :] = True
    scored = torch.tensor([width - 1 - len(t) for t in targets])
    return Encoded(ids, torch.ones_like(ids), ids * 0, scored, tgt, mask)


# --------------------------------------------------------------------------- float64 references


def _generated(model, tokenizer, prompt: str, n: int):
    """``generate``'s greedy tokens (n of them) and its per-step attention weights, unpadded."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            output_attentions=True, return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), out.attentions


def _reference(model, tokenizer, prompt: str, answer: list[int], steps) -> dict[str, float]:
    """Every score of one item, token by token in float64. RAUQ reads ``generate``'s steps as
    LM-Polygraph does: step j's single query row (it feeds ŷ_{j−1} and predicts ŷ_j), its weight
    on the last key, ŷ_{j−1}; ŷ_1's confidence is its probability."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + answer])).logits[0].double()
    log_p, entropies = [], []
    for t, token in enumerate(answer):
        logp = torch.log_softmax(logits[len(ids) - 1 + t], -1)
        log_p.append(float(logp[token]))
        entropies.append(float(-(logp.exp() * logp).sum()))
    n = len(answer)
    total = -sum(log_p)
    n_layers, n_heads = len(steps[0]), steps[0][0].shape[1]
    layer_scores = []
    for layer in range(n_layers // 3, math.ceil(n_layers / 3 * 2) + 1):
        prev = [[float(steps[j][layer][0, h, 0, -1]) for j in range(1, n)] for h in range(n_heads)]
        means = [sum(row) / len(row) if row else 0.0 for row in prev]
        head = means.index(max(means))
        c = [math.exp(log_p[0])]
        for j in range(1, n):
            c.append(sequence.ALPHA * math.exp(log_p[j]) + (1 - sequence.ALPHA) * prev[head][j - 1] * c[-1])
        layer_scores.append(1 - sum(math.log(v) for v in c) / n)
    return {
        "sequence_nll": total,
        "perplexity": total / n,
        "max_token_nll": max(-v for v in log_p),
        "sequence_doubt": 1 - math.exp(-total),
        "mean_token_entropy": sum(entropies) / n,
        "rauq": max(layer_scores),
    }


def test_every_score_equals_a_token_by_token_reference(backbone):
    """On a left-padded batch of answers of 3, 1 and 2 tokens (the model's own greedy ones), each
    score is its float64 reference of that item alone, unpadded."""
    model, tok = backbone.model, backbone.tokenizer
    generated = [_generated(model, tok, p, n) for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    answers = [answer for answer, _ in generated]
    assert [len(a) for a in answers] == LENGTHS
    out = sequence.from_forward(run_forward(model, encode(tok, PROMPTS, answers), attentions=True))
    assert set(out) == set(NAMES) and all(v.dtype == torch.float32 and v.shape == (3,) for v in out.values())
    for i, (prompt, (answer, steps)) in enumerate(zip(PROMPTS, generated, strict=True)):
        expected = _reference(model, tok, prompt, answer, steps)
        for name in NAMES:
            assert_close(out[name][i].double(), torch.tensor(expected[name], dtype=torch.float64),
                         rtol=1e-4, atol=1e-5, msg=f"{name}, item {i}")


def test_rauq_by_hand_on_constructed_attention_weights():
    """Two items (3 and 2 answer tokens, left-padded), 4 layers of 2 heads: RAUQ reads layers 1..3,
    the head with the highest mean weight of a position on itself, and the worst layer."""
    width, n_max = 6, 3
    enc = _encoded([[0, 1, 2], [3, 4]], width)
    p = [[0.9, 0.5, 0.8], [None, 0.6, 0.3]]  # p of each slot's token (item 1's slot 0 is padding)
    vocab = 8
    logits = torch.full((2, n_max, vocab), -30.0)
    for b in range(2):
        for j in range(n_max):
            if p[b][j] is not None:
                logits[b, j, enc.targets[b, j]] = 0.0
                logits[b, j, 7] = math.log((1 - p[b][j]) / p[b][j])  # the rest of the mass on token 7
    # the diagonal weight at slot j's predicting position (width − 1 − n_max + j), per layer and head
    weights = {  # (layer, head): [slot 0, slot 1, slot 2], the same for both items
        (0, 0): [0.0, 0.01, 0.01], (0, 1): [0.0, 0.02, 0.01],  # the worst layer, but RAUQ never reads layer 0
        (1, 0): [0.9, 0.3, 0.5], (1, 1): [0.1, 0.6, 0.4],  # head 1: the higher mean over slots 1..2
        (2, 0): [0.2, 0.7, 0.7], (2, 1): [0.9, 0.2, 0.1],
        (3, 0): [0.5, 0.5, 0.5], (3, 1): [0.5, 0.5, 0.5],  # a tie: the first head
    }
    attentions = tuple(torch.zeros(2, 2, width, width) for _ in range(4))
    for (layer, head), values in weights.items():
        for j, v in enumerate(values):
            q = width - 1 - n_max + j
            attentions[layer][:, head, q, q] = v
            attentions[layer][:, head, q, 0] = 1 - v  # rows sum to 1; the rest is never read
    got = sequence.from_forward(Forward(enc, logits, attentions=attentions))["rauq"]

    def by_hand(probs, slots):
        scores = []
        for layer in (1, 2, 3):
            means = [sum(weights[layer, h][j] for j in slots[1:]) / (len(slots) - 1) for h in (0, 1)]
            head = 0 if means[0] >= means[1] else 1
            c = [probs[slots[0]]]
            for j in slots[1:]:
                c.append(0.2 * probs[j] + 0.8 * weights[layer, head][j] * c[-1])
            scores.append(1 - sum(math.log(v) for v in c) / len(c))
        return max(scores)

    expected = torch.tensor([by_hand(p[0], [0, 1, 2]), by_hand(p[1], [1, 2])])
    assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)
    assert sequence.rauq_layers(4) == range(1, 4) and sequence.rauq_layers(30) == range(10, 21)
    assert sequence.rauq_layers(32) == range(10, 23) and sequence.rauq_layers(1) == range(0, 1)
    assert all(sequence.rauq_layers(n) == range(n // 3, math.ceil(n / 3 * 2) + 1) for n in range(3, 100))


# --------------------------------------------------------------------------- one token, precision


def test_one_answer_token_ties_the_likelihoods_and_sequence_doubt_is_msp():
    """With one answer token the three likelihoods are one number, bit for bit (a sum, a mean and a
    max of one value and exact zeros), and ``sequence_doubt`` is ``msp``: both are 1 − p from the
    other tokens' mass, through at most a ``log1p``/``expm1`` pair (a few float32 roundings, some
    1e-7 relative) where 1 − p < 1/2, and from ``log_softmax``'s own rounding (some 1e-6 relative at
    these logits' scale) where it is not. ``rtol=1e-5`` bounds roundings, not a reduction order, so
    it holds on any CPU and thread count."""
    gen = torch.Generator().manual_seed(0)
    n, vocab = 64, 300
    logits = torch.randn((n, 1, vocab), generator=gen) * 3
    y = logits.argmax(-1).view(n)
    logits[torch.arange(n), 0, y] += 30 * torch.rand(n, generator=gen)  # 1 − p from ~1 to ~1e-13
    enc = _encoded([[int(t)] for t in y], 4)
    out = sequence.from_forward(Forward(enc, logits))
    assert torch.equal(out["sequence_nll"], out["perplexity"]) and torch.equal(out["sequence_nll"], out["max_token_nll"])
    msp = baselines.from_logits(logits, enc)["msp"]
    assert (msp < 1e-7).sum() >= 10 and (msp > 0.5).sum() >= 1  # both regimes
    assert_close(out["sequence_doubt"], msp, rtol=1e-5, atol=0)
    assert torch.equal(out["sequence_doubt"].argsort(), msp.argsort())
    assert torch.equal(out["sequence_nll"].argsort(), msp.argsort())  # no ties where p rounds to 1
    assert_close(out["mean_token_entropy"], baselines.from_logits(logits, enc)["entropy"])


def test_an_item_without_answer_tokens_is_nan():
    enc = _encoded([[1, 2], [3]], 4)
    enc.target_mask[1] = False
    out = sequence.from_forward(Forward(enc, torch.randn(2, 2, 5)))
    assert all(v[1].isnan() and v[0].isfinite() for v in out.values())


# --------------------------------------------------------------------------- orientation


def test_scores_rise_when_the_answer_loses_mass():
    """Less mass on one answer token raises every likelihood score and ``rauq``; a flatter
    distribution raises the entropy; a lower weight on the previous token raises ``rauq``."""
    width, vocab = 5, 6
    enc = _encoded([[0, 1, 2], [0, 1, 2]], width)
    logits = torch.zeros(2, 3, vocab)
    logits[:, torch.arange(3), torch.tensor([0, 1, 2])] = 4.0
    logits[1, 1, 1] = 1.0  # item 1's second token is less likely; everything else is the same
    attentions = tuple(torch.full((2, 2, width, width), 0.5) for _ in range(4))
    out = sequence.from_forward(Forward(enc, logits, attentions=attentions))
    for name in NAMES:
        assert out[name][1] > out[name][0], name
    less = tuple(a.clone() for a in attentions)
    for a in less:
        a[1] *= 0.2  # item 1 attends less to the previous token everywhere
    same = sequence.from_forward(Forward(enc, logits[[0, 0]], attentions=less))
    assert same["rauq"][1] > same["rauq"][0] and same["sequence_nll"][1] == same["sequence_nll"][0]


# --------------------------------------------------------------------------- the family in a run


def test_the_family_in_the_registry():
    family = registry.BY_NAME["sequence"]
    assert [f.name for f in registry.FAMILIES][1:3] == ["margin", "sequence"]
    assert family.names == tuple(NAMES) and not family.first_token_only
    assert all(family.why_not(n, registry.setting(aggregate=how)) is None for n in NAMES for how in ("first", "max"))
    assert family.needs_of("rauq") == {"whole_word", "attentions"} and family.needs_of("perplexity") == {"whole_word"}
    assert set(NAMES) <= set(registry.references()) and not set(NAMES) & set(registry.SCORE_DEFAULTS)
    plain, with_rauq = Plan.of(["perplexity"], "first"), Plan.of(["perplexity", "rauq"], "first")
    assert plain.whole_word and not plain.kept["attentions"] and with_rauq.kept["attentions"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_scoring_straight_from_generate_equals_complete_then_scores(name):
    """``score_prompts`` reads the attention weights ``generate`` kept (laid out as the shared
    forward's) and switches an sdpa model to eager attention for ``rauq``; the scores are those of
    a separate forward over the prompts and their completions, words of several lengths among them."""
    backbone = Backbone(name, attn_implementation="sdpa")
    prompts = [*PROMPTS, "spill the", "break the"]
    runner = Runner(backbone, None, EstimatorConfig(batch_size=2, max_new_tokens=3), progress=False)
    completions, got = runner.score_prompts(prompts, NAMES)
    assert len({len(c.word_ids) for c in completions}) >= 2
    expected = runner.scores(prompts, completions, NAMES)
    assert set(got) == set(expected) == {*NAMES, *sequence.FAMILY.tokens}
    for key in NAMES:
        assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    for key in sequence.FAMILY.tokens:
        assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)
    # per answer token, from index 0: as many values as the answer has tokens, NaN after; they sum to the whole
    lengths = torch.tensor([len(c.word_ids) for c in completions])
    assert got["token_nll"].shape == (len(prompts), 3)
    assert torch.equal((~got["token_nll"].isnan()).sum(1), lengths)
    assert_close(got["token_nll"].nan_to_num().sum(1), got["sequence_nll"], rtol=1e-5, atol=1e-5)
    assert_close(got["token_entropy"].nanmean(1), got["mean_token_entropy"], rtol=1e-5, atol=1e-5)
    assert registry.per_item("token_nll", got["token_nll"][0]) == got["token_nll"][0, : lengths[0]].tolist()
