"""The fixes found in review (issue 8), each against a case constructed to fail without it.

1. ``latent_mi`` draws fresh z noise batch after batch (one generator per run), reproducibly.
2. ``latent_kl`` reads q(z|prompt, target) at the last token of the whole completion word, as in training.
3. ``aggregate=mean|max`` refuses the estimators that read the first token only, visibly.
4. ``msp`` keeps ranking where p(ŷ) rounds to 1 in float32.
5. The probe is fitted on items disjoint from the evaluated ones and out-of-sample for the latent.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vtrans.cli import main
from vtrans.data import IdiomItem
from vtrans.estimators import baselines
from vtrans.evaluate import EvalConfig, Harness, evaluate
from vtrans.generate import Completion
from vtrans.latent import kl_normal
from vtrans.scorer import Scorer
from vtrans.tokens import Encoded, encode

PROMPT = "Complete the idiom: the early bird catches the"
ITEM = IdiomItem(idiom="the early bird catches the worm", prefix="the early bird catches the", target="worm")
FIRST_TOKEN_ONLY = ["attention_entropy", "mc_dropout_var", "mc_dropout_entropy", "mc_dropout_mi", "latent_mi"]


@pytest.fixture(scope="module")
def latent(tiny_gpt2):
    """A tiny conditional latent with random heads and projection: z moves the logits, q differs from p."""
    from vtrans.module import LatentLM

    assert tiny_gpt2.model.config.n_layer == 4
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LatentLM(tiny_gpt2, d_z=4, prior="conditional", hidden=16).eval()
        with torch.no_grad():
            for linear, std in (
                (module.latent.posterior_head.net[-1], 0.2),
                (module.latent.prior_head.net[-1], 0.2),
                (module.latent.proj, 2.0),
            ):
                linear.weight.normal_(0.0, std)
    return module


def _harness(module, **config) -> Harness:
    return Harness(module.backbone, module, EvalConfig(n_boot=100, **config), progress=False)


# --------------------------------------------------------------------------- 1. latent_mi noise


def test_latent_mi_draws_fresh_noise_for_each_batch(latent):
    """batch_size=1 and two identical items: the same noise for both would give equal latent_mi."""
    harness = _harness(latent, batch_size=1, samples=4)
    _, scores = harness.score_prompts([PROMPT, PROMPT], ["latent_mi"])
    mi = scores["latent_mi"]
    assert (mi > 1e-6).all()  # z moves the prediction: the values say something about the noise
    assert not torch.isclose(mi[0], mi[1], rtol=1e-4, atol=0)
    _, again = harness.score_prompts([PROMPT, PROMPT], ["latent_mi"])
    assert torch.equal(again["latent_mi"], mi)  # the run is reproducible for a fixed seed
    _, other_seed = _harness(latent, batch_size=1, samples=4, seed=1).score_prompts([PROMPT, PROMPT], ["latent_mi"])
    assert not torch.equal(other_seed["latent_mi"], mi)


def test_evaluate_harness_draws_fresh_noise_for_each_batch(latent):
    harness = _harness(latent, batch_size=1, samples=4)
    first = harness.score([ITEM, ITEM], ["latent_mi"], gold=False).scores["latent_mi"]
    assert not torch.isclose(first[0], first[1], rtol=1e-4, atol=0)
    assert torch.equal(harness.score([ITEM, ITEM], ["latent_mi"], gold=False).scores["latent_mi"], first)


def test_scorer_draws_fresh_noise_across_its_batches(latent):
    """``vtrans score`` runs one harness call per batch: the run's generator goes on between them."""
    scorer = Scorer(latent, estimators=["latent_mi"], batch_size=1, samples=4, quiet=True)
    a, b = (r["scores"]["latent_mi"] for r in scorer.score([PROMPT, PROMPT]))
    assert a != pytest.approx(b, rel=1e-4)
    assert [r["scores"]["latent_mi"] for r in scorer.score([PROMPT, PROMPT])] == [a, b]


def test_standalone_latent_scores_seed_their_own_generator(latent):
    from vtrans.estimators import latent as latent_estimators

    enc = encode(latent.backbone.tokenizer, [PROMPT], [[262]])
    one = latent_estimators.scores(latent, enc, samples=4, seed=3)["latent_mi"]
    assert torch.equal(latent_estimators.scores(latent, enc, samples=4, seed=3)["latent_mi"], one)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(latent_estimators.scores(latent, enc, samples=4, generator=generator)["latent_mi"], one)
    second = latent_estimators.scores(latent, enc, samples=4, generator=generator)["latent_mi"]
    assert not torch.equal(second, one)  # the same generator goes on: fresh noise


# --------------------------------------------------------------------------- 2. latent_kl reads the whole word


def _multi_token_completion(tokenizer) -> Completion:
    ids = tokenizer(" flabbergastingly", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2, "the test needs a completion word of several tokens"
    return Completion(" flabbergastingly", "flabbergastingly", ids[0], tuple(ids))


def _kl_by_hand(module, targets: list[int]) -> torch.Tensor:
    enc = encode(module.backbone.tokenizer, [PROMPT], [targets])
    with torch.no_grad():
        q_loc, q_scale, p_loc, p_scale = module.distributions(module.lower(enc), enc)
    return kl_normal(q_loc, q_scale, p_loc, p_scale).sum(-1)


@pytest.mark.parametrize("path", ["score", "score_prompts"])
def test_latent_kl_reads_the_last_token_of_the_whole_word(latent, path, monkeypatch):
    completion = _multi_token_completion(latent.backbone.tokenizer)
    harness = _harness(latent, batch_size=2, samples=2)
    monkeypatch.setattr(harness, "complete", lambda prompts: [completion] * len(prompts))
    if path == "score":
        got = harness.score([ITEM], ["latent_kl"], gold=False).scores["latent_kl"]
    else:
        got = harness.score_prompts([PROMPT], ["latent_kl"])[1]["latent_kl"]
    whole, first = _kl_by_hand(latent, list(completion.word_ids)), _kl_by_hand(latent, [completion.first_token])
    assert not torch.isclose(whole, first, rtol=1e-3).any()  # the two readings differ here
    assert_close(got, whole, rtol=1e-4, atol=1e-5)


def test_prompt_only_latent_scores_do_not_change_with_the_whole_word(latent, monkeypatch):
    """posterior_var and latent_mi read the scored position: causal attention keeps them as they were."""
    from vtrans.estimators import latent as latent_estimators

    completion = _multi_token_completion(latent.backbone.tokenizer)
    harness = _harness(latent, batch_size=2, samples=3)
    monkeypatch.setattr(harness, "complete", lambda prompts: [completion] * len(prompts))
    got = harness.score_prompts([PROMPT], ["posterior_var", "latent_mi"])[1]
    first = encode(latent.backbone.tokenizer, [PROMPT], [[completion.first_token]])
    expected = latent_estimators.scores(latent, first, samples=3, seed=0)
    for name in ("posterior_var", "latent_mi"):
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- 3. aggregate=mean|max


@pytest.mark.parametrize("how", ["mean", "max"])
def test_aggregate_refuses_the_first_token_only_estimators(latent, how, tmp_path, monkeypatch):
    from vtrans import checkpoint

    monkeypatch.setattr(checkpoint, "load", lambda path, device="cpu": latent)
    names = ["msp", *FIRST_TOKEN_ONLY, "posterior_var", "latent_kl"]
    config = EvalConfig(data="builtin", max_items=4, estimators=names, aggregate=how, passes=2, samples=2, n_boot=100)
    results = evaluate(config, tmp_path / "run", ckpt="random.ckpt", progress=False)
    assert list(results["estimators"]) == ["msp", "posterior_var", "latent_kl"]
    assert set(results["dropped"]) == set(FIRST_TOKEN_ONLY)
    assert all("first completion token only" in why and "--aggregate first" in why for why in results["dropped"].values())


def test_aggregate_refusal_is_a_warning_on_the_command_line(tmp_path, capsys):
    main(["evaluate", "--model", "tiny-gpt2", "--data", "builtin", "--max-items", "4", "--n-boot", "100", "-T", "2",
          "--aggregate", "mean", "--estimators", "msp,attention_entropy,mc_dropout_var", "--out", str(tmp_path / "run"),
          "--quiet"])
    err = capsys.readouterr().err
    assert err.startswith("warning: not run: attention_entropy, mc_dropout_var: reads the first completion token only")
    assert err.count("\n") == 1


def test_scorer_keeps_the_first_token_and_runs_them(latent):
    """``vtrans score`` has no aggregate option: it reads the first token, so nothing is refused."""
    scorer = Scorer(latent, estimators=["msp", "attention_entropy", "latent_mi"], samples=2, quiet=True)
    assert scorer.config.aggregate == "first"
    [record] = scorer.score([PROMPT])
    assert all(math.isfinite(v) for v in record["scores"].values()) and len(record["scores"]) == 3


# --------------------------------------------------------------------------- 4. msp in float32


def _encoded_first_tokens(targets: torch.Tensor) -> Encoded:
    """A batch of one-token targets (the ids and masks are never read by ``from_logits``)."""
    n = targets.shape[0]
    ones = torch.ones((n, 1), dtype=torch.long)
    return Encoded(ones, ones, ones * 0, torch.zeros(n, dtype=torch.long), targets.view(n, 1), ones.bool())


def test_msp_tells_apart_probabilities_that_round_to_one():
    vocab = 50
    logits = torch.zeros(2, 1, vocab)
    for i, rest in enumerate((1e-9, 1e-8)):  # p(ŷ) = 1 − rest, ŷ = token 0
        logits[i, 0, 1:] = math.log(rest / (vocab - 1))
    logits += 7.0  # a logit scale where float32 cannot hold 1 − p near 1 either
    msp = baselines.from_logits(logits, _encoded_first_tokens(torch.zeros(2, dtype=torch.long)))["msp"]
    assert msp[0] < msp[1]
    assert_close(msp, torch.tensor([1e-9, 1e-8]), rtol=1e-4, atol=0)


def test_msp_ranks_exactly_as_minus_log_p():
    gen = torch.Generator().manual_seed(0)
    n, vocab = 64, 300
    logits = torch.randn((n, 1, vocab), generator=gen) * 3
    y = logits.argmax(-1).view(n)  # greedy ŷ, then raised above the rest by 0..30 nats: 1 − p from ~1 to ~1e-13
    logits[torch.arange(n), 0, y] += 30 * torch.rand(n, generator=gen)
    msp = baselines.from_logits(logits, _encoded_first_tokens(y))["msp"]
    # the reference in float64, from the odds of the other tokens r = (1 − p) / p: −log p = log1p(r)
    x = logits.double().view(n, vocab)
    others = torch.ones_like(x, dtype=torch.bool).scatter(1, y.unsqueeze(1), False)
    ratio = ((x - x[torch.arange(n), y].unsqueeze(1)).exp() * others).sum(1)
    nll = torch.log1p(ratio)
    assert (torch.softmax(logits, -1)[torch.arange(n), 0, y] == 1).sum() >= 10  # p rounds to 1 in float32
    assert torch.equal(msp.argsort(), nll.argsort())
    assert_close(msp.double(), ratio / (1 + ratio), rtol=1e-4, atol=0)  # still 1 − p in value
