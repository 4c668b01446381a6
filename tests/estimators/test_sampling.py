"""Sampled-word agreement: the word comparison by hand, and the family in the harness on a tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import Encoded
from vtrans.cli import main
from vtrans.config import EvalConfig
from vtrans.data import DEFAULT_TEMPLATE, load_split
from vtrans.errors import ConfigError
from vtrans.estimators import sampling
from vtrans.estimators.base import Forward
from vtrans.estimators.runner import Runner
from vtrans.evaluation.scored import score_items

NAMES = ["sample_disagreement", "sample_word_entropy", "cocoa"]


@pytest.fixture(scope="module")
def gpt2() -> Backbone:
    backbone = Backbone("tiny-gpt2")
    assert backbone.model.config.n_layer == 4
    return backbone


def test_words_are_compared_normalised():
    got = sampling.word_scores(["cake", " Pie!"], [["cake", "cake", "pie", "Cake."], ["pie", "pie", "pie", "pie"]])
    p = torch.tensor([0.75, 0.25])
    assert_close(got["sample_disagreement"], torch.tensor([0.25, 0.0]))
    assert_close(got["sample_word_entropy"], torch.stack([-(p * p.log()).sum(), torch.tensor(0.0)]))


def test_no_word_is_a_word_of_its_own():
    got = sampling.word_scores(["", "cake"], [["", "...", "cake"], ["pie", "tart", "bun"]])
    assert_close(got["sample_disagreement"], torch.tensor([1 / 3, 1.0]))
    assert_close(got["sample_word_entropy"], torch.tensor([-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)), math.log(3)]))


def test_cocoa_is_the_answers_improbability_times_the_disagreement():
    """By hand: u(ŷ) · (1 − share of samples that agree); 0 where every sample agrees, and it rises
    with either factor while the other stays fixed."""
    nll = torch.tensor([0.1, 2.0, 2.0, 5.0])
    disagreement = torch.tensor([0.5, 0.5, 0.0, 0.25])
    assert_close(sampling.cocoa(nll, disagreement), torch.tensor([0.05, 1.0, 0.0, 1.25]))
    more_doubt = sampling.cocoa(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]))
    more_disagreement = sampling.cocoa(torch.tensor([1.0, 1.0]), torch.tensor([0.25, 0.75]))
    assert more_doubt[1] > more_doubt[0] and more_disagreement[1] > more_disagreement[0]


def test_answer_nll_is_minus_log_p_of_the_completion_tokens():
    """By hand, in float64: item 0 has one real slot (the right-aligned second), item 1 two; "first"
    reads each item's first real slot, "mean" averages its real slots."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]], [[1.0, 3.0, 0.0], [0.0, 0.5, 0.5]]])
    targets = torch.tensor([[0, 0], [1, 2]])
    mask = torch.tensor([[False, True], [True, True]])
    ids = torch.zeros(2, 3, dtype=torch.long)
    enc = Encoded(ids, torch.ones_like(ids), ids, torch.tensor([2, 2]), targets, mask)
    logp = torch.log_softmax(logits.double(), -1)
    first = torch.stack([-logp[0, 1, 0], -logp[1, 0, 1]])
    mean = torch.stack([-logp[0, 1, 0], -(logp[1, 0, 1] + logp[1, 1, 2]) / 2])
    forward = Forward(enc, logits)
    assert_close(sampling.answer_nll(forward, "first").double(), first)
    assert_close(sampling.answer_nll(forward, "mean").double(), mean)


def test_cocoa_reads_the_forward_as_msp_does(gpt2):
    """In the harness, ``cocoa`` / ``sample_disagreement`` = −log p(ŷ) where the samples disagree,
    with p(ŷ) = 1 − ``msp`` item by item (one forward, one set of samples), and ``cocoa`` is exactly
    0 where they all agree. ``msp`` is the other tokens' mass, a float32 logsumexp over V = 50,257
    terms near 1: its error is below log2(V) · 6e-8 ≈ 1e-6 on any CPU and thread count, so the two
    p agree within atol 2e-6 (p itself is near 1/V ≈ 2e-5 on this random tiny model)."""
    items = load_split("builtin", "test")[:8]
    config = EvalConfig(agreement_samples=4, agreement_temperature=0.05, batch_size=8)
    run = score_items(Runner(gpt2, config=config, progress=False), items, ["msp", *NAMES], DEFAULT_TEMPLATE)
    msp, dis, got = (run.scores[n].double() for n in ("msp", "sample_disagreement", "cocoa"))
    assert bool((got[dis == 0] == 0).all()) and bool((got[dis > 0] > 0).all())
    assert bool((dis > 0).any())
    assert_close(torch.exp(-got[dis > 0] / dis[dis > 0]), 1 - msp[dis > 0], rtol=0.0, atol=2e-6)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="agreement_samples must be >= 2"):
        EvalConfig(agreement_samples=1)
    with pytest.raises(ConfigError, match="agreement_temperature must be > 0"):
        EvalConfig(agreement_temperature=0)


def test_scores_match_the_samples_by_hand(gpt2):
    """The family's scores equal word_scores of K completions sampled one prompt at a time."""
    from vtrans.backbone.generate import complete

    prompts = [f"Complete the idiom: {it.prefix}" for it in load_split("builtin", "test")[:3]]
    greedy = complete(gpt2.model, gpt2.tokenizer, prompts)
    got = sampling.scores(gpt2.model, gpt2.tokenizer, prompts, greedy, k=4, seed=5, batch_size=1)  # one prompt a batch
    by_hand = [
        [c.word for c in complete(gpt2.model, gpt2.tokenizer, [p] * 4, do_sample=True, seed=5)] for p in prompts[:1]
    ]
    first = sampling.word_scores([greedy[0].word], by_hand)
    assert_close(got["sample_disagreement"][:1], first["sample_disagreement"])
    assert_close(got["sample_word_entropy"][:1], first["sample_word_entropy"])
    assert got["sample_disagreement"].shape == (3,)


def test_family_leaves_greedy_completions_and_other_scores_unchanged(gpt2):
    items = load_split("builtin", "test")[:6]
    # a random tiny model is nearly uniform: a low temperature makes samples agree at times
    config = EvalConfig(agreement_samples=4, agreement_temperature=0.05, batch_size=8, passes=3)
    alone = score_items(Runner(gpt2, config=config, progress=False), items, ["msp", "entropy", "mc_dropout_mi"], DEFAULT_TEMPLATE)
    state = torch.random.get_rng_state()
    both = score_items(Runner(gpt2, config=config, progress=False), items, ["msp", "entropy", "mc_dropout_mi", *NAMES], DEFAULT_TEMPLATE)
    assert torch.equal(torch.random.get_rng_state(), state)  # sampling drew nothing from the global stream
    assert [c.text for c in both.completions] == [c.text for c in alone.completions]
    for name in ("msp", "entropy", "mc_dropout_mi"):
        assert torch.equal(both.scores[name], alone.scores[name]), name
    assert both.seconds["sampling"] > 0
    again = score_items(Runner(gpt2, config=config, progress=False), items, NAMES, DEFAULT_TEMPLATE)
    for name in NAMES:
        assert torch.equal(again.scores[name], both.scores[name])  # reproducible for a seed
    assert both.scores["sample_word_entropy"].unique().numel() > 1  # the values vary: a real check
    other = score_items(Runner(gpt2, config=replace(config, seed=1), progress=False), items, NAMES, DEFAULT_TEMPLATE)
    assert not torch.equal(other.scores["sample_word_entropy"], both.scores["sample_word_entropy"])


@pytest.mark.slow
def test_evaluate_writes_every_name_of_the_family(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["evaluate", "--model", "tiny-gpt2", "--data", "builtin", "--max_items", "8", "--n_boot", "100",
            "--estimators", "msp," + ",".join(NAMES), "--agreement_samples", "4", "--agreement_temperature", "0.05", "--quiet", "--out", str(out)]
    main(args)
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert list(results["estimators"]) == ["msp", *NAMES]
    for name in NAMES:
        assert results["estimators"][name]["cost_forward_equiv"] > 0
        values = [row["scores"][name] for row in rows]
        assert all(math.isfinite(v) for v in values)
    assert all(0 <= row["scores"]["sample_disagreement"] <= 1 for row in rows)
    assert all(0 <= row["scores"]["sample_word_entropy"] <= math.log(4) + 1e-6 for row in rows)
    assert results["config"]["agreement_samples"] == 4
    main([*args[:-1], str(tmp_path / "again")])
    again = [json.loads(line) for line in (tmp_path / "again" / "scores.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in again] == [r["scores"] for r in rows]


def test_scorer_runs_the_family(gpt2):
    from vtrans.latent.model import LatentModel
    from vtrans.scoring.scorer import Scorer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LatentModel(gpt2, d_z=4, prior="standard", hidden=16).eval()
    prompts = ["Complete the idiom: a piece of", "Complete the idiom: break the"]
    with_family = list(Scorer(module, ["msp", *NAMES], agreement_samples=3, quiet=True).score(prompts))
    without = list(Scorer(module, ["msp"], quiet=True).score(prompts))
    for a, b in zip(with_family, without, strict=True):
        assert a["completion"] == b["completion"] and a["scores"]["msp"] == b["scores"]["msp"]
        assert all(math.isfinite(a["scores"][name]) for name in NAMES)
