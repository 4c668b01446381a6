"""Every estimator against an independent computation, its orientation, and the state it leaves behind.

References are computed here with plain forwards of single, unpadded prompts, so the
estimators' batching (left padding, position ids, ``logits_to_keep`` slices) is checked too.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vtrans.backbone import architectures
from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import aggregate, encode, slot_positions
from vtrans.estimators import attention, baselines, lens, mc_dropout, probe
from vtrans.estimators import latent as latent_estimators
from vtrans.estimators.base import run_forward
from vtrans.estimators.common import entropy_of_probs, linear_at, log_partition, predictive_stats
from vtrans.evaluation.metrics import auroc
from vtrans.latent.gaussian import kl_normal
from vtrans.latent.model import LatentModel

FAMILIES = ["tiny-gpt2", "tiny-llama"]
# different lengths, so that the batch is left-padded
PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: kill two birds with one", "Complete the idiom: the"]


@pytest.fixture(scope="module")
def models() -> dict[str, Backbone]:
    """Tiny backbones whose final norm is not the identity (a second norm would change the logits)."""
    out = {}
    for name in FAMILIES:
        backbone = Backbone(name)
        assert backbone.n_layers == 4 and backbone.d_model == 64  # the tiny configs, not a full model
        norm = architectures.final_norm(backbone.model)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            norm.weight.uniform_(0.5, 3.0)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(0.0, 0.5)
        out[name] = backbone
    return out


# --------------------------------------------------------------------------- independent references


def plain_logits(model, tokenizer, prompt: str, extra: list[int] = ()) -> torch.Tensor:
    """Logits of a plain forward of one unpadded sequence, (T, V)."""
    ids = tokenizer(prompt)["input_ids"] + list(extra)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def greedy(model, tokenizer, prompt: str, n: int = 1) -> list[int]:
    ids: list[int] = []
    for _ in range(n):
        ids.append(int(plain_logits(model, tokenizer, prompt, ids)[-1].argmax()))
    return ids


def norm_by_hand(model, h: torch.Tensor) -> torch.Tensor:
    norm = architectures.final_norm(model)
    if architectures.family(model) == "gpt2":
        return F.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, norm.eps)
    eps = norm.variance_epsilon
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def embeddings_by_hand(model, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream before block 0, (1, T, C)."""
    h = model.get_input_embeddings()(ids)
    if architectures.family(model) == "gpt2":
        h = h + model.transformer.wpe(torch.arange(ids.shape[1]).unsqueeze(0))
    return h


def nll(logits: torch.Tensor, y: int) -> torch.Tensor:
    return -torch.log_softmax(logits.float(), -1)[y]


def entropy_by_hand(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum().float()


def encoded_with_own_tokens(backbone: Backbone, prompts=PROMPTS, n_tokens: int = 1):
    targets = [greedy(backbone.model, backbone.tokenizer, p, n_tokens) for p in prompts]
    return encode(backbone.tokenizer, prompts, targets), targets


# --------------------------------------------------------------------------- 1. lens


@pytest.mark.parametrize("name", FAMILIES)
def test_lens_last_layer_is_the_models_own_output(models, name):
    backbone = models[name]
    model, tok = backbone.model, backbone.tokenizer
    enc, targets = encoded_with_own_tokens(backbone)
    out = lens.scores(model, enc)
    by_layer = out["lens_ce_by_layer"]
    assert by_layer.shape == (len(PROMPTS), backbone.n_layers + 1)
    expected = torch.stack([nll(plain_logits(model, tok, p)[-1], t[0]) for p, t in zip(PROMPTS, targets, strict=True)])
    assert_close(by_layer[:, -1], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out["lens_ce"], by_layer[:, -1])
    assert_close(out["lens_area"], by_layer.mean(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_lens_layer_zero_decodes_the_embeddings(models, name):
    backbone = models[name]
    model, tok = backbone.model, backbone.tokenizer
    enc, targets = encoded_with_own_tokens(backbone)
    by_layer = lens.scores(model, enc)["lens_ce_by_layer"]
    for i, (prompt, target) in enumerate(zip(PROMPTS, targets, strict=True)):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            h0 = embeddings_by_hand(model, ids)[0, -1]  # (C,) at the scored position
            logits = norm_by_hand(model, h0) @ model.lm_head.weight.T
        assert_close(by_layer[i, 0], nll(logits, target[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_lens_does_not_norm_the_last_layer_twice(models, name):
    """HF's last hidden state is already normed: a second norm would be a different (wrong) number."""
    backbone = models[name]
    model, tok = backbone.model, backbone.tokenizer
    prompt = PROMPTS[0]
    y = greedy(model, tok, prompt)[0]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tok(prompt)["input_ids"]]), output_hidden_states=True)
        own = nll(out.logits[0, -1], y)
        twice = nll(model.lm_head(norm_by_hand(model, out.hidden_states[-1][0, -1])), y)
    assert (twice - own).abs() > 1e-2, "the test cannot tell a double norm apart: the norm is too trivial"
    got = lens.scores(model, encode(tok, [prompt], [[y]]))["lens_ce"][0]
    assert_close(got, own, rtol=1e-4, atol=1e-4)
    assert (got - twice).abs() > 1e-2


def test_lens_gold_trajectory_reads_the_gold_token(models):
    backbone = models["tiny-gpt2"]
    enc, targets = encoded_with_own_tokens(backbone)
    gold = torch.tensor([11, 22, 33])
    out = lens.scores(backbone.model, enc, gold=gold)
    for i, prompt in enumerate(PROMPTS):
        own = plain_logits(backbone.model, backbone.tokenizer, prompt)[-1]
        assert_close(out["lens_ce_gold_by_layer"][i, -1], nll(own, int(gold[i])), rtol=1e-4, atol=1e-4)
    # the ŷ trajectory is unchanged by asking for the gold one
    assert_close(out["lens_ce_by_layer"], lens.scores(backbone.model, enc)["lens_ce_by_layer"])


def lens_by_hand(model, hidden_states, enc, ids: torch.Tensor) -> torch.Tensor:
    """−log softmax(W_U·norm_f(h_ℓ))[id] from the full (B, N, V) logits of every layer, (B, L+1, N)."""
    head, last = model.get_output_embeddings(), len(hidden_states) - 1
    out = []
    for i, h in enumerate(hidden_states):
        h = slot_positions(h, enc)  # (B, N, C)
        logits = head(h if i == last else norm_by_hand(model, h)).float()  # (B, N, V)
        out.append(-torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out, 1)


def with_head_bias(model):
    """A copy of ``model`` whose unembedding has a (random) bias."""
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        head.bias = torch.nn.Parameter(torch.randn(head.out_features) * 2.0)
    return model


@pytest.mark.parametrize("first_only", [True, False])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", FAMILIES)
def test_lens_trajectory_equals_a_full_log_softmax(models, name, bias, first_only):
    """The blocked log-partition and the chosen logits read alone give the full log-softmax's numbers
    (vocabulary 50257: not a multiple of any block), for two id sets, read with or without the final logits."""
    backbone = models[name]
    model = with_head_bias(backbone.model) if bias else backbone.model
    assert model.config.vocab_size % 512 != 0
    enc = encode(backbone.tokenizer, PROMPTS, [[5], [17, 23], [9, 300, 4000]])  # first slots 2, 1, 0
    other = torch.randint(0, model.config.vocab_size, enc.targets.shape, generator=torch.Generator().manual_seed(0))
    fwd = run_forward(model, enc, hidden_states=True)
    rows = torch.arange(len(PROMPTS))
    with torch.no_grad():
        expected = [lens_by_hand(model, fwd.hidden_states, enc, chosen) for chosen in (enc.targets, other)]
    if first_only:
        expected = [e[rows, :, enc.first_slot].unsqueeze(-1) for e in expected]  # (B, L+1, 1)
    for final_logits in (None, fwd.logits):
        got = lens.trajectory(
            model, fwd.hidden_states, enc, enc.targets, other, first_only=first_only, final_logits=final_logits
        )
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape == (len(PROMPTS), backbone.n_layers + 1, 1 if first_only else 3)
            assert_close(g, e, rtol=0, atol=1e-5)


def test_log_partition_in_blocks_equals_logsumexp_of_the_full_logits():
    """Odd vocabulary, a bias, blocks of every width the rule picks and rows run in chunks."""
    gen = torch.Generator().manual_seed(0)
    vocab, width = 1999, 48
    weight, bias = torch.randn(vocab, width, generator=gen), torch.randn(vocab, generator=gen)
    for rows in (1, 7, 300):
        h = torch.randn(rows, width, generator=gen)
        expected = F.linear(h, weight, bias).logsumexp(-1)
        for per_block, max_logits in ((1 << 21, 1 << 26), (512 * rows, 1 << 26), (1, 1 << 26), (1 << 21, 1000)):
            got = log_partition(h, weight, bias, max_logits=max_logits, logits_per_block=per_block)
            assert_close(got, expected, rtol=0, atol=1e-5)
        assert_close(log_partition(h, weight), F.linear(h, weight).logsumexp(-1), rtol=0, atol=1e-5)
    ids = torch.tensor([[0, 1998], [7, 7]])
    h = torch.randn(2, 2, width, generator=gen)
    assert_close(linear_at(h, weight, bias, ids), F.linear(h, weight, bias).gather(-1, ids.unsqueeze(-1)).squeeze(-1))


def test_lens_in_bfloat16_matches_its_full_logits(models):
    """A bf16 model: logits in bf16 as the matrix product rounds them, summed in float32."""
    backbone = models["tiny-llama"]
    model = copy.deepcopy(backbone.model).to(torch.bfloat16)
    enc, _ = encoded_with_own_tokens(backbone)
    fwd = run_forward(model, enc, hidden_states=True)
    with torch.no_grad():
        expected = lens_by_hand(model, fwd.hidden_states, enc, enc.targets)[:, :, -1:]  # (B, L+1, 1)
    got = lens.trajectory(model, fwd.hidden_states, enc, enc.targets, first_only=True, final_logits=fwd.logits)
    assert got.dtype == torch.float32
    assert_close(got, expected, rtol=0, atol=3e-2)


def test_chosen_logits_are_rounded_as_the_matrix_product_rounds_them():
    """In bf16 the chosen logit equals the full product's; summed in float32 without the rounding it
    would exceed log Z at a confident argmax, and −log p would come out negative."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5000, 64, generator=gen).bfloat16()
    h = torch.randn(200, 64, generator=gen).bfloat16()
    full = F.linear(h, weight).float()  # (200, V)
    ids = full.argmax(-1)
    assert torch.equal(linear_at(h, weight, None, ids), full.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    assert (log_partition(h, weight) - linear_at(h, weight, None, ids)).min() >= 0


# --------------------------------------------------------------------------- 2. baselines


@pytest.mark.parametrize("name", FAMILIES)
def test_msp_and_entropy_equal_a_plain_forward(models, name):
    backbone = models[name]
    model, tok = backbone.model, backbone.tokenizer
    enc, targets = encoded_with_own_tokens(backbone)
    out = baselines.scores(model, enc)
    for i, (prompt, target) in enumerate(zip(PROMPTS, targets, strict=True)):
        logits = plain_logits(model, tok, prompt)[-1]
        assert_close(out["msp"][i], 1 - torch.softmax(logits, -1)[target[0]], rtol=1e-4, atol=1e-5)
        assert_close(out["entropy"][i], entropy_by_hand(logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["first", "mean", "max", "last"])
def test_aggregation_over_a_two_token_completion(models, how):
    backbone = models["tiny-gpt2"]
    model, tok = backbone.model, backbone.tokenizer
    two = greedy(model, tok, PROMPTS[0], 2)
    one = greedy(model, tok, PROMPTS[1], 1)
    enc = encode(tok, PROMPTS[:2], [two, one])  # mixed lengths: the 1-token word is masked in slot 0
    out = baselines.scores(model, enc, how)
    logits0 = plain_logits(model, tok, PROMPTS[0], two[:1])[-2:]  # predicts two[0], then two[1]
    msp0 = torch.stack([1 - torch.softmax(logits0[j], -1)[two[j]] for j in range(2)])
    ent0 = torch.stack([entropy_by_hand(logits0[j]) for j in range(2)])
    logits1 = plain_logits(model, tok, PROMPTS[1])[-1]
    msp1, ent1 = 1 - torch.softmax(logits1, -1)[one[0]], entropy_by_hand(logits1)
    reduce = {"first": lambda v: v[0], "mean": lambda v: v.mean(), "max": lambda v: v.max(), "last": lambda v: v[-1]}[how]
    assert_close(out["msp"], torch.stack([reduce(msp0), msp1]), rtol=1e-4, atol=1e-5)
    assert_close(out["entropy"], torch.stack([reduce(ent0), ent1]), rtol=1e-4, atol=1e-4)


def test_aggregate_by_hand_and_rejects_unknown_reductions():
    enc = encode(_FakeTokenizer(), ["ab", "a"], [[5, 6], [7]])
    values = torch.tensor([[1.0, 3.0], [9.0, 2.0]])  # item 1's slot 0 is padding (9 must be ignored)
    assert_close(aggregate(values, enc, "first"), torch.tensor([1.0, 2.0]))
    assert_close(aggregate(values, enc, "mean"), torch.tensor([2.0, 2.0]))
    assert_close(aggregate(values, enc, "max"), torch.tensor([3.0, 2.0]))
    assert_close(aggregate(values, enc, "last"), torch.tensor([3.0, 2.0]))  # the answer's last token
    assert_close(aggregate(torch.tensor([[1.0, 5.0], [9.0, 2.0]]), enc, "last"), torch.tensor([5.0, 2.0]))
    with pytest.raises(ValueError, match="first, mean, max or last"):
        aggregate(values, enc, "median")


class _FakeTokenizer:
    """One token per character: enough for ``encode``."""

    pad_token_id = 0

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


# --------------------------------------------------------------------------- 3. MC dropout


def _dropout_state(model):
    return [(m, m.training, getattr(m, "p", None)) for m in model.modules()]


def _hooks(model) -> list[dict]:
    """Every module's forward hooks. transformers installs output-capturing hooks of its own the
    first time hidden states or attentions are asked for, so "no hooks left" means "the same
    hooks as before", not "none"."""
    return [{**m._forward_hooks, **m._forward_pre_hooks} for m in model.modules()]


def _assert_restored(model, before, hooks_before):
    after = _dropout_state(model)
    assert [(t, p) for _, t, p in after] == [(t, p) for _, t, p in before]
    assert not any(m.training for m in model.modules())
    assert _hooks(model) == hooks_before


@pytest.mark.parametrize("name", FAMILIES)
def test_mc_dropout_off_gives_no_spread(models, name):
    backbone = models[name]
    enc, _ = encoded_with_own_tokens(backbone)
    out = mc_dropout.scores(backbone.model, enc, passes=3, p=0.0)
    # the passes are the same rows of one batch, which a GEMM may still round apart by a float32 ulp
    # when they fall in different row blocks (~1e-7 on p ≤ 1): a variance of at most ~1e-14
    assert_close(out["mc_dropout_var"], torch.zeros(len(PROMPTS)), rtol=0, atol=1e-12)
    assert_close(out["mc_dropout_mi"], torch.zeros(len(PROMPTS)), rtol=0, atol=1e-5)
    # the mean of identical distributions is the distribution: its entropy is the plain entropy
    assert_close(out["mc_dropout_entropy"], baselines.scores(backbone.model, enc)["entropy"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_mc_dropout_on_gives_spread(models, name):
    backbone = models[name]
    enc, _ = encoded_with_own_tokens(backbone)
    torch.manual_seed(0)
    out = mc_dropout.scores(backbone.model, enc, passes=4, p=0.3)
    assert (out["mc_dropout_var"] > 0).all()
    assert (out["mc_dropout_mi"] > 0).all()


def test_mc_dropout_reference_against_passes_by_hand(models):
    """The batched, repeated passes give the statistics of the same passes run one by one."""
    backbone = models["tiny-llama"]
    enc, targets = encoded_with_own_tokens(backbone)
    torch.manual_seed(3)
    logits = mc_dropout.sample_logits(backbone.model, enc, passes=4, p=0.2)  # (B, T, V)
    assert logits.shape[:2] == (len(PROMPTS), 4)
    y = torch.tensor([t[0] for t in targets])
    stats = predictive_stats(logits, y)
    probs = torch.softmax(logits.double(), -1)
    p_y = probs[torch.arange(len(PROMPTS)), :, y]  # (B, T)
    mean = probs.mean(1)
    h_mean = -(mean * mean.log()).sum(-1)
    mean_h = -(probs * probs.log()).sum(-1).mean(1)
    assert_close(stats["var"], p_y.var(1, unbiased=False).float(), rtol=1e-4, atol=1e-9)
    assert_close(stats["entropy"], h_mean.float(), rtol=1e-4, atol=1e-5)
    assert_close(stats["mi"], (h_mean - mean_h).clamp_min(0).float(), rtol=1e-3, atol=1e-5)


def test_mc_dropout_unembeds_only_the_scored_columns_and_bounds_a_chunks_logits(models):
    """With no dropout the passes are the plain forward: the logits at each item's first slot, the
    same whether the unembedding ran on the scored columns only, in chunks bounded by a logits
    budget of a few rows' worth (a vocabulary 5x SmolLM2's must not hold 256 rows' logits at once)."""
    backbone = models["tiny-llama"]
    model = backbone.model
    enc = encode(backbone.tokenizer, PROMPTS, [[5], [6, 7, 8], [9, 10]])  # targets of other lengths: other slots
    vocab = model.get_output_embeddings().weight.shape[0]
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        logits = mc_dropout.sample_logits(model, enc, passes=2, p=0.0, max_logits=3 * vocab)
    finally:
        handle.remove()
    with torch.no_grad():
        full = model(**enc.inputs).logits
    scored = enc.input_ids.shape[1] - enc.targets.shape[1] - 1 + enc.first_slot  # the column that predicts ŷ
    expected = full[torch.arange(len(PROMPTS)), scored]
    # the same float32 operations on fewer rows: agreement to rounding (logits of size ~1)
    assert_close(logits, expected.unsqueeze(1).expand(-1, 2, -1), rtol=1e-5, atol=1e-5)
    columns = len(set(scored.tolist()))
    assert all(rows * cols * v <= 3 * vocab and cols == columns for rows, cols, v in shapes)
    assert sum(rows for rows, _, _ in shapes) == 2 * len(PROMPTS)


def test_predictive_stats_read_in_chunks_of_items_equal_one_piece_and_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 1001, generator=gen) * 4  # (B, S, V)
    y = torch.randint(0, 1001, (5,), generator=gen)
    probs = torch.softmax(logits.double(), -1)
    mean = probs.mean(1)
    h_mean = -(mean * mean.log()).sum(-1)
    expected = {
        "var": probs[torch.arange(5), :, y].var(1, unbiased=False),
        "entropy": h_mean,
        "mi": h_mean + (probs * probs.log()).sum(-1).mean(1),
        "nll": -probs[torch.arange(5), :, y].mean(1).log(),
    }
    whole = predictive_stats(logits, y, logits_per_chunk=1 << 30)
    for per_chunk in (1, 2 * 3 * 1001):  # an item at a time; two items at a time (the last chunk holds one)
        chunked = predictive_stats(logits, y, logits_per_chunk=per_chunk)
        for name, value in expected.items():
            assert_close(chunked[name], whole[name], rtol=0, atol=1e-5)
            assert_close(chunked[name], value.float(), rtol=1e-4, atol=1e-5)


def test_predictive_stats_mi_near_zero_keeps_its_digits():
    """Samples that barely differ: an MI of about 1e-6 nats beside entropies of several nats.

    Written as H(p̄) − E_s H(p_s) in float32, each entropy (about 5 nats here) carries a rounding
    error of about 1e-6 that depends on the summation order, as large as the MI itself. The mean
    KL in float64 has terms of about 1e-3 whose rounding is about 1e-16 each: the MI keeps ~9
    digits, so 1e-5 relative holds on any CPU, and the order of the vocabulary (a CPU's
    summation order) does not move it beyond that.
    """
    gen = torch.Generator().manual_seed(0)
    vocab = 1001
    logits = torch.randn(4, 1, vocab, generator=gen) * 3 + 1e-3 * torch.randn(4, 8, vocab, generator=gen)  # (B, S, V)
    y = torch.randint(0, vocab, (4,), generator=gen)
    probs = torch.softmax(logits.double(), -1)
    mean = probs.mean(1, keepdim=True)
    reference = (probs * (probs.log() - mean.log())).sum(-1).mean(1)  # E_s KL(p_s ‖ p̄), float64
    assert (reference > 1e-7).all() and (reference < 1e-5).all()  # the case the test is about
    stats = predictive_stats(logits, y)
    assert_close(stats["mi"], reference.float(), rtol=1e-5, atol=0)
    perm = torch.randperm(vocab, generator=gen)
    permuted = predictive_stats(logits[..., perm], torch.argsort(perm)[y])
    assert_close(permuted["mi"], stats["mi"], rtol=1e-5, atol=0)
    assert_close(permuted["nll"], stats["nll"], rtol=1e-6, atol=0)


def test_gpt2_attention_probability_dropout_alone_is_on(models):
    backbone = models["tiny-gpt2"]
    enc, _ = encoded_with_own_tokens(backbone)
    torch.manual_seed(0)
    off = mc_dropout.sample_logits(backbone.model, enc, passes=3, p=0.0, attention_p=0.0)
    assert_close(off.std(1), torch.zeros_like(off[:, 0]), rtol=0, atol=1e-6)
    only_attention = mc_dropout.sample_logits(backbone.model, enc, passes=3, p=0.0, attention_p=0.5)
    assert (only_attention.std(1).amax(-1) > 1e-4).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_mc_dropout_restores_the_model(models, name):
    model = models[name].model
    before, hooks_before = _dropout_state(model), _hooks(model)
    original_p = [p for _, _, p in before if p is not None]
    with mc_dropout.mc_dropout(model, 0.37, attention_p=0.5):
        if architectures.family(model) == "gpt2":
            assert any(m.training for m in model.modules())
            assert {getattr(m, "p", None) for m in architectures.native_dropout(model)} >= {0.37, 0.5}
        else:
            added = sum(map(len, _hooks(model))) - sum(map(len, hooks_before))
            assert added == 2 * architectures.n_layers(model)  # attention and MLP branch of every block
    _assert_restored(model, before, hooks_before)
    assert [p for _, _, p in _dropout_state(model) if p is not None] == original_p
    with pytest.raises(RuntimeError, match="inside"), mc_dropout.mc_dropout(model, 0.2):
        raise RuntimeError("inside the context")
    _assert_restored(model, before, hooks_before)
    with pytest.raises(ValueError, match=r"\[0, 1\)"), mc_dropout.mc_dropout(model, 1.0):
        pass
    _assert_restored(model, before, hooks_before)


# --------------------------------------------------------------------------- 4. latent


@pytest.fixture(scope="module")
def latent_modules(models):
    """Untrained tiny latents (zero projection) of both priors on the GPT-2 backbone."""
    from vtrans.latent.model import LatentModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {
            prior: LatentModel(models["tiny-gpt2"], d_z=4, prior=prior, hidden=16).eval()
            for prior in ("standard", "conditional")
        }


def _randomize(linear: torch.nn.Linear, seed: int, std: float = 0.5):
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        linear.weight.normal_(0.0, std)


def _hand_states(module, enc):
    """Layer-k states at the scored position and at the last token, from a plain forward."""
    with torch.no_grad():
        out = module.backbone.model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=enc.position_ids,
            output_hidden_states=True,
        )
    h = out.hidden_states[module.layer]  # the raw stream after block k (k = module.layer blocks below)
    rows = torch.arange(h.shape[0])
    return h[rows, enc.scored], h[:, -1]


@pytest.mark.parametrize("prior", ["standard", "conditional"])
def test_untrained_latent_has_no_effect(latent_modules, models, prior):
    module = latent_modules[prior]
    assert torch.count_nonzero(module.latent.proj.weight) == 0
    enc, _ = encoded_with_own_tokens(models["tiny-gpt2"])
    out = latent_estimators.scores(module, enc, samples=4)
    assert_close(out["latent_mi"], torch.zeros(len(PROMPTS)), rtol=0, atol=1e-5)
    # posterior_var: the mean of scale² of the inference distribution, computed by hand
    h_scored, _ = _hand_states(module, enc)
    head = module.latent.posterior_head if prior == "standard" else module.latent.prior_head
    _, scale = head(h_scored)
    assert_close(out["posterior_var"], scale.pow(2).mean(-1), rtol=1e-4, atol=1e-5)
    if prior == "conditional":
        # at init both heads output N(0, I) (zero last layer): q == p and the KL is exactly 0
        assert_close(out["latent_kl"], torch.zeros(len(PROMPTS)), rtol=0, atol=1e-6)
    else:
        assert "latent_kl" not in out


def test_latent_estimators_with_trained_heads(models):
    """Random heads and projection: posterior_var, latent_kl and latent_mi against hand computations."""

    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LatentModel(models["tiny-gpt2"], d_z=4, prior="conditional", hidden=16).eval()
    _randomize(module.latent.posterior_head.net[-1], 1, 0.2)
    _randomize(module.latent.prior_head.net[-1], 2, 0.2)
    _randomize(module.latent.proj, 3, 2.0)
    enc, targets = encoded_with_own_tokens(models["tiny-gpt2"])
    samples, seed = 5, 11
    out = latent_estimators.scores(module, enc, samples=samples, seed=seed)

    h_scored, h_last = _hand_states(module, enc)
    q_loc, q_scale = module.latent.posterior_head(torch.cat([h_scored, h_last], -1))
    p_loc, p_scale = module.latent.prior_head(h_scored)
    assert_close(out["posterior_var"], p_scale.pow(2).mean(-1), rtol=1e-4, atol=1e-5)
    kl = kl_normal(q_loc, q_scale, p_loc, p_scale).sum(-1)
    assert (kl > 0).all()
    assert_close(out["latent_kl"], kl, rtol=1e-4, atol=1e-5)
    # an independent closed form of KL(N(q) || N(p)) per dimension
    by_hand = (p_scale / q_scale).log() + (q_scale**2 + (q_loc - p_loc) ** 2) / (2 * p_scale**2) - 0.5
    assert_close(out["latent_kl"], by_hand.sum(-1), rtol=1e-4, atol=1e-5)

    # latent_mi: the same z samples, injected into a plain forward with a hook after block k
    eps = latent_estimators.item_noise(list(range(len(PROMPTS))), samples, 4, seed)  # each item's own draws
    z = p_loc.unsqueeze(1) + p_scale.unsqueeze(1) * eps  # (B, S, d_z): inference uses p(z|prompt)
    logits = torch.stack([_logits_with_z(module, enc, z[:, s]) for s in range(samples)], 1)  # (B, S, V)
    y = torch.tensor([t[0] for t in targets])
    expected = predictive_stats(logits, y)["mi"]
    assert (expected > 1e-4).all()
    assert_close(out["latent_mi"], expected, rtol=1e-3, atol=1e-5)


def _logits_with_z(module, enc, z: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the scored position with proj(z) added to the stream after block k."""
    model = module.backbone.model
    delta = module.latent.proj(z)  # (B, C)
    where = enc.after_scored.unsqueeze(-1).float()  # (B, T, 1)

    def add_z(mod, args, output):
        if isinstance(output, tuple):
            return (output[0] + where * delta.unsqueeze(1), *output[1:])
        return output + where * delta.unsqueeze(1)

    handle = architectures.blocks(model)[module.layer - 1].register_forward_hook(add_z)
    try:
        with torch.no_grad():
            out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids)
    finally:
        handle.remove()
    return out.logits[torch.arange(z.shape[0]), enc.scored].float()


# --------------------------------------------------------------------------- 5. orientation


def _sharpened(model, factor: float):
    """A copy whose final norm is scaled: 0 gives uniform logits, a large factor peaked ones."""
    sharp = copy.deepcopy(model)
    norm = architectures.final_norm(sharp)
    with torch.no_grad():
        norm.weight.mul_(factor)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(factor)
    return sharp


@pytest.mark.parametrize("name", FAMILIES)
def test_every_score_is_higher_when_the_model_is_unsure(models, name):
    backbone = models[name]
    flat, peaked = _sharpened(backbone.model, 0.0), _sharpened(backbone.model, 50.0)
    vocab = backbone.model.config.vocab_size

    def all_scores(model):
        enc, _ = encoded_with_own_tokens(SimpleNamespace(model=model, tokenizer=backbone.tokenizer))
        torch.manual_seed(0)
        return {
            **baselines.scores(model, enc),
            **lens.scores(model, enc),
            **mc_dropout.scores(model, enc, passes=3, p=0.1),
        }

    unsure, sure = all_scores(flat), all_scores(peaked)
    for key in ("msp", "entropy", "lens_ce", "mc_dropout_entropy"):
        assert (unsure[key] > sure[key]).all(), key
    # the flat model is exactly uniform at its output
    assert_close(unsure["entropy"], torch.full((len(PROMPTS),), math.log(vocab)), rtol=1e-5, atol=1e-4)
    assert_close(unsure["lens_ce"], torch.full((len(PROMPTS),), math.log(vocab)), rtol=1e-5, atol=1e-4)


def test_entropy_of_constructed_attention_rows():
    n = 7
    uniform = torch.full((n,), 1.0 / n)
    one_hot = F.one_hot(torch.tensor(3), n).float()
    assert_close(entropy_of_probs(uniform), torch.tensor(math.log(n)))
    assert entropy_of_probs(one_hot) == 0  # 0·log 0 = 0, no NaN
    assert entropy_of_probs(uniform) > entropy_of_probs(torch.tensor([0.7, 0.1, 0.1, 0.1, 0, 0, 0]))


def _zero_queries(model):
    """A copy whose attention scores are all 0: every row is uniform over the visible positions."""
    flat = copy.deepcopy(model)
    with torch.no_grad():
        for block in architectures.blocks(flat):
            if architectures.family(flat) == "gpt2":
                c = flat.config.hidden_size
                block.attn.c_attn.weight[:, :c] = 0
                block.attn.c_attn.bias[:c] = 0
            else:
                block.self_attn.q_proj.weight.zero_()
    return flat


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_entropy_is_highest_for_uniform_attention(models, name):
    backbone = models[name]
    enc, _ = encoded_with_own_tokens(backbone)
    uniform = attention.scores(_zero_queries(backbone.model), enc)["attention_entropy"]
    lengths = torch.tensor([len(backbone.tokenizer(p)["input_ids"]) for p in PROMPTS], dtype=torch.float32)
    # uniform over the prompt's own tokens (padding masked out) in every head and layer
    assert_close(uniform, lengths.log(), rtol=1e-4, atol=1e-4)
    learned = attention.scores(backbone.model, enc)["attention_entropy"]
    assert (learned < uniform).all()


def test_attention_entropy_needs_eager_attention(models):
    model = models["tiny-gpt2"].model
    enc, _ = encoded_with_own_tokens(models["tiny-gpt2"])
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="eager"):
            attention.scores(model, enc)
    finally:
        model.set_attn_implementation("eager")


# --------------------------------------------------------------------------- 6. probe


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    errors = (torch.rand(n, generator=g) < 0.4).float()
    x = torch.randn((n, 5), generator=g)
    x[:, 1] += 3.0 * errors  # one informative feature among noise
    x[:, 3] *= 100.0  # and a badly scaled one: the probe standardises
    return x, errors


def test_probe_learns_separable_data():
    x, errors = _synthetic(200, 0)
    fitted = probe.fit(x, errors, [f"f{i}" for i in range(5)])
    x_test, errors_test = _synthetic(200, 1)
    predicted = fitted.predict(x_test)
    assert predicted.shape == (200,) and ((predicted >= 0) & (predicted <= 1)).all()
    assert auroc(predicted, errors_test) > 0.9
    assert fitted.weight[1] == fitted.weight.abs().max()  # the informative feature carries the weight


def test_probe_refuses_one_class():
    x, _ = _synthetic(50, 0)
    with pytest.raises(ValueError, match="one class"):
        probe.fit(x, torch.ones(50), [f"f{i}" for i in range(5)])
    with pytest.raises(ValueError, match="one class"):
        probe.fit(x, torch.zeros(50), [f"f{i}" for i in range(5)])


def test_probe_features_are_the_lens_trajectory_then_the_known_scalars():
    lens_by_layer = torch.arange(6.0).view(2, 3)
    scores = {"msp": torch.tensor([0.1, 0.2]), "lens_ce": torch.tensor([5.0, 6.0]), "entropy": torch.tensor([1.0, 2.0])}
    x, names = probe.features({**scores, "lens_ce_by_layer": lens_by_layer})
    assert names == ["lens_ce_L0", "lens_ce_L1", "lens_ce_L2", "entropy", "msp"]
    assert_close(x, torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.1], [3.0, 4.0, 5.0, 2.0, 0.2]]))


def test_predictive_nll_is_minus_log_of_the_mean_probability_even_when_it_underflows():
    from vtrans.estimators.common import predictive_stats

    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], [[-200.0, 0.0, 0.0], [-120.0, 0.0, 0.0]]])
    y = torch.tensor([0, 0])
    nll = predictive_stats(logits, y)["nll"]
    p = torch.softmax(logits.double(), -1)[:, :, 0].mean(1)
    assert nll[0].item() == pytest.approx(-math.log(p[0].item()), rel=1e-6)
    # p(ŷ) of exp(-120) and exp(-200) underflow float32: the log-space mean does not
    assert nll[1].item() == pytest.approx(120 + math.log(2) + math.log(2), rel=1e-4)
