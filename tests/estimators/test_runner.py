"""The runner: one shared forward per batch gives each family the numbers of its own forward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vtrans.backbone.architectures import attention_implementation
from vtrans.backbone.generate import Completion
from vtrans.backbone.tokens import encode
from vtrans.config import EstimatorConfig
from vtrans.estimators import attention, baselines, lens, registry
from vtrans.estimators import latent as latent_estimators
from vtrans.estimators.base import Family, Fitted, Posterior, run_forward
from vtrans.estimators.runner import Runner
from vtrans.latent.model import LatentModel

PROMPTS = ["Complete the idiom: the early bird catches the", "Complete the idiom: a piece of", "once in a blue"]
SINGLE_PASS = ["msp", "entropy", "margin", "attention_entropy", "lens_ce", "lens_area", "posterior_var", "latent_kl"]


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def latent(request):
    from vtrans.backbone.loading import Backbone

    backbone = Backbone(request.param, attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LatentModel(backbone, d_z=4, prior="conditional", hidden=16).eval()
        with torch.no_grad():
            for linear, std in ((module.latent.posterior_head.net[-1], 0.2), (module.latent.proj, 2.0)):
                linear.weight.normal_(0.0, std)
    return module


def _completions(tokenizer) -> list[Completion]:
    """Completions of several tokens, so that the whole word and its first token differ."""
    out = []
    for word in ("flabbergastingly", "cake", "moonstruck"):
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        out.append(Completion(" " + word, word, ids[0], tuple(ids)))
    return out


def test_shared_forward_gives_each_family_its_own_numbers(latent):
    model, tok = latent.backbone.model, latent.backbone.tokenizer
    completions = _completions(tok)
    runner = Runner(latent.backbone, latent, EstimatorConfig(batch_size=2), progress=False)
    got = runner.scores(PROMPTS, completions, SINGLE_PASS)
    assert set(got) == {*SINGLE_PASS, "lens_ce_by_layer"}
    # each family alone, on ŷ only (the latent's latent_kl on the whole word), sdpa where it can
    first = encode(tok, PROMPTS, [[c.first_token] for c in completions])
    whole = encode(tok, PROMPTS, [list(c.word_ids) for c in completions])
    expected = {**baselines.scores(model, first), **lens.scores(model, first)}
    with attention_implementation(model, "eager"):
        expected.update(attention.scores(model, first))
    expected.update(latent_estimators.scores(latent, whole, mi=False))
    top = torch.softmax(run_forward(model, first).logits[:, -1].float(), -1).topk(2).values
    expected["margin"] = 1 - (top[:, 0] - top[:, 1])
    for name in SINGLE_PASS:
        assert_close(got[name], expected[name].float(), rtol=1e-4, atol=1e-5, msg=name)
    assert_close(got["lens_ce_by_layer"], expected["lens_ce_by_layer"], rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # eager for the attentions, then back


def test_one_forward_per_batch_serves_every_single_pass_estimator(latent):
    model = latent.backbone.model
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        runner = Runner(latent.backbone, latent, EstimatorConfig(batch_size=2), progress=False)
        runner.scores(PROMPTS, _completions(latent.backbone.tokenizer), SINGLE_PASS)
    finally:
        handle.remove()
    assert len(calls) == 2  # 3 prompts in batches of 2


def test_latent_samples_read_the_forward_like_the_training_decoder(latent):
    """The S samples run only the scored position on the forward's keys and values: the logits
    of ``module.decode`` (the training path, which runs the whole suffix) for the same z."""
    tok = latent.backbone.tokenizer
    enc = encode(tok, PROMPTS, [list(c.word_ids) for c in _completions(tok)])
    forward = run_forward(latent.backbone.model, enc, hidden_states=True, cache=True)
    h = forward.hidden_states[latent.layer]
    assert_close(h, latent.lower(enc), rtol=1e-5, atol=1e-6)  # the layer-k state is the forward's
    z = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    got = latent_estimators.sample_logits(latent, h, enc, forward.cache, z, rows_per_chunk=10)  # 2 items a chunk
    rows = torch.arange(3)
    expected = torch.stack([latent.decode(h, z[:, s], enc)[rows, enc.first_slot] for s in range(5)], 1)
    assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 1e-3  # z moves the logits: a real check


def test_z_sample_chunks_are_bounded_by_the_vocabulary(latent, monkeypatch):
    """A chunk holds at most ``max_logits`` logits (one item's S samples at least): Gemma 3's 262,144
    tokens run a quarter of the rows SmolLM2's 49,152 do; the logits are the same in any chunking."""
    assert latent_estimators.chunk_rows(49_152) == latent_estimators.chunk_rows(50_257) == 512
    assert latent_estimators.chunk_rows(262_144) == 128
    tok = latent.backbone.tokenizer
    enc = encode(tok, PROMPTS, [list(c.word_ids) for c in _completions(tok)])
    forward = run_forward(latent.backbone.model, enc, hidden_states=True, cache=True)
    h, vocab = forward.hidden_states[latent.layer], latent.backbone.model.config.vocab_size
    z = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    whole = latent_estimators.sample_logits(latent, h, enc, forward.cache, z)  # 15 rows: one chunk
    real = latent_estimators.chunk_rows
    monkeypatch.setattr(latent_estimators, "chunk_rows", lambda v: real(v, max_logits=10 * vocab))  # 10 rows: 2 items
    chunks = [logits.shape for _, logits in latent_estimators.sample_chunks(latent, h, enc, forward.cache, z)]
    assert chunks == [(2, 5, vocab), (1, 5, vocab)]
    assert_close(torch.cat([c for _, c in latent_estimators.sample_chunks(latent, h, enc, forward.cache, z)]), whole,
                 rtol=1e-5, atol=1e-5)


def test_a_new_family_is_one_entry(latent, monkeypatch):
    """A family added to the registry is planned, gets what it needs and is read like the others."""

    def read(forward, context):
        assert forward.hidden_states is not None and forward.cache is None
        return {"stream_norm": forward.first_slot(forward.hidden_states[-1][:, -forward.logits.shape[1] - 1 : -1]).norm(dim=-1)}

    family = Family("norm", {"stream_norm": "norm of the last state"}, read, needs=frozenset({"hidden_states"}))
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, family))
    runner = Runner(latent.backbone, latent, EstimatorConfig(batch_size=2), progress=False)
    got = runner.scores(PROMPTS, _completions(latent.backbone.tokenizer), ["msp", "stream_norm"])
    assert set(got) == {"msp", "stream_norm"} and (got["stream_norm"] > 0).all()
    assert registry.why_not("stream_norm") is None


def test_eligibility_comes_from_the_registry(latent):
    assert registry.why_not("latent_mi") == "needs a trained latent (--ckpt)"
    assert registry.why_not("latent_mi", latent, "mean").startswith("reads the first completion token only")
    assert registry.why_not("margin", None, "max") is None
    runner = Runner(latent.backbone, None, EstimatorConfig(aggregate="mean"), progress=False)
    assert runner.runnable(["msp", "latent_mi", "attention_entropy", "probe"]) == [
        "msp", "lens_ce", "entropy",  # the probe's features that apply here: no latent, no first-token-only ones
    ]
    assert all(len(row.split()) >= 5 for row in registry.table().splitlines()[1:])  # name, family, needs, score, help


@pytest.mark.parametrize("names", [SINGLE_PASS, [n for n in registry.SCORE_DEFAULTS if n != "margin"] + ["mc_dropout_mi"]])
@pytest.mark.parametrize(("aggregate", "max_new_tokens"), [("first", 1), ("first", 3), ("mean", 3)])
def test_scoring_straight_from_generate_equals_complete_then_scores(latent, names, aggregate, max_new_tokens):
    """``score_prompts`` reads the states ``generate`` kept (one pass); the scores are those of a
    separate forward over the prompts and their completions, whatever the words' lengths,
    including words cut at ``max_new_tokens`` (their last token is fed once more) and a budget
    of one token (nothing generated is fed)."""
    prompts = [*PROMPTS, "spill the", "break the"]  # words of 3 tokens from both tiny models
    config = EstimatorConfig(batch_size=2, samples=4, passes=2, aggregate=aggregate, max_new_tokens=max_new_tokens)
    runner = Runner(latent.backbone, latent, config, progress=False)
    completions, got = runner.score_prompts(prompts, names, start=5)
    assert completions == runner.complete(prompts, start=5)
    if max_new_tokens == 3:
        assert {len(c.word_ids) for c in completions} == {1, 3}  # words of several lengths, some cut
    expected = runner.scores(prompts, completions, names, start=5)
    assert set(got) == set(expected) and {"lens_ce", "latent_kl"} <= set(got)
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_generate_keeps_its_states_only_when_asked(latent):
    from vtrans.backbone.generate import generate_batch

    model, tok = latent.backbone.model, latent.backbone.tokenizer
    plain, generation = generate_batch(model, tok, PROMPTS, max_new_tokens=2)
    assert generation.hidden_states is None and generation.attentions is None and generation.cache is None
    kept, generation = generate_batch(model, tok, PROMPTS, max_new_tokens=2, hidden_states=True, cache=True)
    assert kept == plain
    assert generation.fed == generation.sequences.shape[1] - 1 == generation.hidden_states[0].shape[1]


def test_sampled_completions_are_the_same_when_generate_keeps_its_states(latent):
    config = EstimatorConfig(batch_size=2, sample=True, temperature=1.5, seed=3)
    runner = Runner(latent.backbone, latent, config, progress=False)
    completions, _ = runner.score_prompts(PROMPTS, ["lens_ce", "posterior_var"], start=7)
    assert completions == runner.complete(PROMPTS, start=7)
    assert completions != Runner(latent.backbone, latent, EstimatorConfig(batch_size=2), progress=False).complete(PROMPTS)


def test_the_reference_is_chosen_in_the_registry():
    """The best AUROC among the families declared references, in registry order on a tie; an
    undefined AUROC counts lowest; none when no reference ran."""
    assert registry.references() == (
        "msp", "entropy", "margin", "sequence_nll", "perplexity", "max_token_nll", "sequence_doubt",
        "mean_token_entropy", "rauq", "sample_disagreement", "sample_word_entropy", "cocoa",
    )
    assert registry.reference_of({"msp": 0.6, "entropy": 0.7, "latent_mi": 0.9}) == "entropy"
    assert registry.reference_of({"margin": 0.7, "entropy": 0.7}) == "entropy"
    assert registry.reference_of({"msp": float("nan"), "margin": 0.2}) == "margin"
    assert registry.reference_of({"latent_mi": 0.9}) == ""
    assert registry.reference_of({"msp": 0.6, "latent_mi": 0.9}, among=("latent_mi",)) == "latent_mi"


def test_a_fitted_family_is_planned_through_its_features(latent, monkeypatch):
    """A fitted name runs as the estimators that give its features; a family that writes per-item
    fields runs in every run that asks for them."""
    family = Family(
        "fitted_kl", {"kl_fitted": "latent_kl, fitted"}, None, reads_forward=False,
        fitted=Fitted(
            "held-out labelled items", lambda features, errors: lambda other: other["latent_kl"], ("latent_kl", "lens_ce_by_layer")
        ),
    )
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, family))
    assert registry.fitted(["msp", "kl_fitted", "probe", "unknown"]) == ["kl_fitted", "probe"]
    assert registry.computed(["msp", "kl_fitted"]) == ["msp", "latent_kl", "lens_ce"]
    assert registry.with_fields(["msp"]) == ["msp", "lens_ce"] and registry.with_fields(["lens_area"]) == ["lens_area"]
    assert registry.writer_of("lens_ce_gold_by_layer") == "lens_ce"
    runner = Runner(latent.backbone, latent, EstimatorConfig(batch_size=2), progress=False)
    got = runner.scores(PROMPTS, _completions(latent.backbone.tokenizer), ["kl_fitted"])
    assert set(got) == {"latent_kl", "lens_ce", "lens_ce_by_layer"}


def test_a_family_either_reads_or_is_fitted():
    def fit(features, errors):
        return lambda other: other["msp"]

    with pytest.raises(ValueError, match="either a read, or how it is fitted"):
        Family("both", {"x": "x"}, lambda forward, context: {}, fitted=Fitted("items", fit, ()))
    with pytest.raises(ValueError, match="either a read, or how it is fitted"):
        Family("neither", {"x": "x"}, None)
    with pytest.raises(ValueError, match="one name"):
        Family("two", {"x": "x", "y": "y"}, None, fitted=Fitted("items", fit, ()))
    with pytest.raises(ValueError, match="needs one"):
        Family("loose", {"x": "x"}, lambda forward, context: {}, posterior=Posterior("p", "p", lambda latent, data: None))
