"""The fixes found in review (issue 8), each against a case constructed to fail without it.

1. ``latent_mi`` draws each item's z noise from its own seed: fresh from item to item, reproducibly,
   whatever the batch size.
2. ``latent_kl`` reads q(z|prompt, target) at the last token of the whole completion word, as in training.
3. ``aggregate=mean|max`` refuses the estimators that read the first token only, visibly.
4. ``msp`` keeps ranking where p(ŷ) rounds to 1 in float32.
5. The probe is fitted on items disjoint from the evaluated ones and out-of-sample for the latent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from vtrans.backbone.generate import Completion, complete
from vtrans.backbone.tokens import Encoded, encode
from vtrans.cli import main
from vtrans.config import EstimatorConfig, EvalConfig
from vtrans.data import (
    DEFAULT_TEMPLATE,
    IdiomItem,
    _idiom_key,
    load_split,
    normalize_word,
    render_prompt,
    split_idiom,
    split_items,
)
from vtrans.estimators import baselines
from vtrans.estimators.runner import Runner
from vtrans.evaluation.evaluate import evaluate
from vtrans.evaluation.fitted import Unfittable, fit_items
from vtrans.evaluation.scored import score_items
from vtrans.latent.gaussian import kl_normal
from vtrans.scoring.scorer import Scorer

PROMPT = "Complete the idiom: the early bird catches the"
ITEM = IdiomItem(idiom="the early bird catches the worm", prefix="the early bird catches the", target="worm")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FIRST_TOKEN_ONLY = ["attention_entropy", "mc_dropout_var", "mc_dropout_entropy", "mc_dropout_mi", "latent_mi"]


@pytest.fixture(scope="module")
def latent(tiny_gpt2):
    """A tiny conditional latent with random heads and projection: z moves the logits, q differs from p."""
    from vtrans.latent.module import LatentLM

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


def _runner(module, **config) -> Runner:
    return Runner(module.backbone, module, EstimatorConfig(**config), progress=False)


# --------------------------------------------------------------------------- 1. latent_mi noise


def test_latent_mi_draws_fresh_noise_for_each_item(latent):
    """Two identical items: the same noise for both would give equal latent_mi."""
    runner = _runner(latent, batch_size=1, samples=4)
    _, scores = runner.score_prompts([PROMPT, PROMPT], ["latent_mi"])
    mi = scores["latent_mi"]
    assert (mi > 1e-6).all()  # z moves the prediction: the values say something about the noise
    assert not torch.isclose(mi[0], mi[1], rtol=1e-4, atol=0)
    _, again = runner.score_prompts([PROMPT, PROMPT], ["latent_mi"])
    assert torch.equal(again["latent_mi"], mi)  # the run is reproducible for a fixed seed
    _, other_seed = _runner(latent, batch_size=1, samples=4, seed=1).score_prompts([PROMPT, PROMPT], ["latent_mi"])
    assert not torch.equal(other_seed["latent_mi"], mi)
    _, together = _runner(latent, batch_size=2, samples=4).score_prompts([PROMPT, PROMPT], ["latent_mi"])
    # an item's draws do not depend on its batch; what may differ is the float32 rounding of its
    # logits in a batch of another shape (~1e-6 on logits of order 1 here), which moves latent_mi by
    # at most max|Δlogit| · E|log p_s/p̄| (about 0.1 at an MI of 3e-3): an absolute 1e-6, whatever
    # the CPU (the statistic itself is exact to ~1e-15, see predictive_stats)
    assert_close(together["latent_mi"], mi, rtol=0, atol=1e-6)
    _, later = runner.score_prompts([PROMPT], ["latent_mi"], start=1)
    assert torch.equal(later["latent_mi"], mi[1:])  # a run scored in pieces draws as one call


def test_evaluate_draws_fresh_noise_for_each_item(latent):
    runner = _runner(latent, batch_size=1, samples=4)
    first = score_items(runner, [ITEM, ITEM], ["latent_mi"], DEFAULT_TEMPLATE, gold=False).scores["latent_mi"]
    assert not torch.isclose(first[0], first[1], rtol=1e-4, atol=0)
    again = score_items(runner, [ITEM, ITEM], ["latent_mi"], DEFAULT_TEMPLATE, gold=False).scores["latent_mi"]
    assert torch.equal(again, first)


def test_scorer_draws_fresh_noise_across_its_batches(latent):
    """``vtrans score`` runs the runner once per batch: items go on being numbered from batch to batch."""
    scorer = Scorer(latent, estimators=["latent_mi"], batch_size=1, samples=4, quiet=True)
    a, b = (r["scores"]["latent_mi"] for r in scorer.score([PROMPT, PROMPT]))
    assert abs(a - b) > 1e-4  # fresh noise for each item: far apart beside the 1e-6 below
    assert [r["scores"]["latent_mi"] for r in scorer.score([PROMPT, PROMPT])] == [a, b]
    together = Scorer(latent, estimators=["latent_mi"], batch_size=2, samples=4, quiet=True)
    # the same draws in a batch of two: only the logits' float32 rounding differs (see the test above)
    assert [r["scores"]["latent_mi"] for r in together.score([PROMPT, PROMPT])] == pytest.approx([a, b], rel=0, abs=1e-6)


def test_standalone_latent_scores_seed_each_item(latent):
    from vtrans.estimators import latent as latent_estimators

    enc = encode(latent.backbone.tokenizer, [PROMPT], [[262]])
    one = latent_estimators.scores(latent, enc, samples=4, seed=3)["latent_mi"]
    assert torch.equal(latent_estimators.scores(latent, enc, samples=4, seed=3)["latent_mi"], one)
    other = latent_estimators.scores(latent, enc, samples=4, seed=3, indices=[1])["latent_mi"]
    assert not torch.equal(other, one)  # another item index: other draws


# --------------------------------------------------------------------------- 2. latent_kl reads the whole word


def _multi_token_completion(tokenizer) -> Completion:
    ids = tokenizer(" flabbergastingly", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2, "the test needs a completion word of several tokens"
    return Completion(" flabbergastingly", "flabbergastingly", ids[0], tuple(ids))


def _kl_by_hand(module, targets: list[int], prompt: str = PROMPT) -> torch.Tensor:
    enc = encode(module.backbone.tokenizer, [prompt], [targets])
    with torch.no_grad():
        q_loc, q_scale, p_loc, p_scale = module.distributions(module.lower(enc), enc)
    return kl_normal(q_loc, q_scale, p_loc, p_scale).sum(-1)


@pytest.mark.parametrize("path", ["score", "scores"])
def test_latent_kl_reads_the_last_token_of_the_whole_word(latent, path, monkeypatch):
    completion = _multi_token_completion(latent.backbone.tokenizer)
    runner = _runner(latent, batch_size=2, samples=2)
    monkeypatch.setattr(runner, "complete", lambda prompts, start=0: [completion] * len(prompts))
    if path == "score":
        got = score_items(runner, [ITEM], ["latent_kl"], DEFAULT_TEMPLATE, gold=False).scores["latent_kl"]
    else:
        got = runner.scores([PROMPT], [completion], ["latent_kl"])["latent_kl"]
    whole, first = _kl_by_hand(latent, list(completion.word_ids)), _kl_by_hand(latent, [completion.first_token])
    assert not torch.isclose(whole, first, rtol=1e-3).any()  # the two readings differ here
    assert_close(got, whole, rtol=1e-4, atol=1e-5)


def test_latent_kl_of_bare_prompts_reads_the_whole_generated_word(latent):
    """``score_prompts`` takes the states from ``generate`` itself: the word it generated, whole."""
    prompt = "spill the"  # the tiny GPT-2 writes a word of 3 tokens here
    completions, got = _runner(latent, max_new_tokens=4).score_prompts([prompt], ["latent_kl"])
    word = list(completions[0].word_ids)
    assert len(word) >= 2
    whole, first = _kl_by_hand(latent, word, prompt), _kl_by_hand(latent, word[:1], prompt)
    assert not torch.isclose(whole, first, rtol=1e-3).any()
    assert_close(got["latent_kl"], whole, rtol=1e-4, atol=1e-5)


def test_prompt_only_latent_scores_do_not_change_with_the_whole_word(latent):
    """posterior_var and latent_mi read the scored position: causal attention keeps them as they were."""
    from vtrans.estimators import latent as latent_estimators

    completion = _multi_token_completion(latent.backbone.tokenizer)
    runner = _runner(latent, batch_size=2, samples=3)
    got = runner.scores([PROMPT], [completion], ["posterior_var", "latent_mi", "latent_kl"])  # the whole word encoded
    first = encode(latent.backbone.tokenizer, [PROMPT], [[completion.first_token]])
    expected = latent_estimators.scores(latent, first, samples=3, seed=0)
    for name in ("posterior_var", "latent_mi"):
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- 3. aggregate=mean|max


@pytest.mark.parametrize("how", ["mean", "max"])
def test_aggregate_refuses_the_first_token_only_estimators(latent, how, tmp_path, monkeypatch):
    from vtrans.latent import checkpoint

    monkeypatch.setattr(checkpoint, "load", lambda path, device="cpu", backbone=None: latent)
    monkeypatch.setattr(checkpoint, "split_settings", lambda path: {})  # no file to read them from
    monkeypatch.setattr(checkpoint, "trained_idiom_hashes", lambda path: None)
    names = ["msp", *FIRST_TOKEN_ONLY, "posterior_var", "latent_kl"]
    config = EvalConfig(data="builtin", max_items=4, estimators=names, aggregate=how, passes=2, samples=2, n_boot=100)
    results = evaluate(config, tmp_path / "run", ckpt="random.ckpt", progress=False)
    assert list(results["estimators"]) == ["msp", "posterior_var", "latent_kl"]
    assert set(results["dropped"]) == set(FIRST_TOKEN_ONLY)
    assert all("first completion token only" in why and "--aggregate first" in why for why in results["dropped"].values())


def test_aggregate_refusal_is_a_warning_on_the_command_line(tmp_path, capsys):
    main(["evaluate", "--model", "tiny-gpt2", "--data", "builtin", "--max_items", "4", "--n_boot", "100", "--passes", "2",
          "--aggregate", "mean", "--estimators", "msp,attention_entropy,mc_dropout_var", "--out", str(tmp_path / "run")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: not run")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: not run: attention_entropy, mc_dropout_var: reads the first completion token only")


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


# --------------------------------------------------------------------------- 5. the probe on any file

BUILTIN_SPLIT = {"data": "builtin", "seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}


def _keys(items) -> set[str]:
    return {_idiom_key(it.idiom) for it in items}


def _rewritten(idiom: str) -> str:
    """The same idiom as another file may write it: capitalised, with trailing punctuation."""
    return idiom[0].upper() + idiom[1:] + "!"


def test_probe_fit_items_of_a_checkpoint_are_its_val_split_less_the_evaluated():
    val, test = load_split("builtin", "val"), load_split("builtin", "test")
    evaluated = [split_idiom(_rewritten(it.idiom)) for it in val[:5]] + test[:3]
    items, source = fit_items(evaluated, BUILTIN_SPLIT)
    assert _keys(items) == _keys(val) - _keys(val[:5]) and len(items) == len(val) - 5
    assert not _keys(items) & _keys(evaluated)
    assert not _keys(items) & _keys(load_split("builtin", "train"))  # in-sample for the latent: never
    assert "val split of builtin" in source and "checkpoint" in source
    # the split the latent was trained with, not the default one
    items, _ = fit_items(evaluated, {**BUILTIN_SPLIT, "seed": 1})
    assert _keys(items) == _keys(load_split("builtin", "val", seed=1)) - _keys(evaluated)
    assert _keys(items) != _keys(val) - _keys(evaluated)


def test_probe_fit_items_without_a_checkpoint_are_the_builtin_train_and_val_less_the_evaluated():
    train, val, test = (load_split("builtin", s) for s in ("train", "val", "test"))
    evaluated = train[:4] + val[:2] + test[:2]
    items, source = fit_items(evaluated)
    assert source == "builtin:train+val"
    assert _keys(items) == (_keys(train) | _keys(val)) - _keys(evaluated)
    assert len(items) == len(train) + len(val) - 6


def test_probe_fit_items_refuse_what_is_not_out_of_sample(tmp_path):
    """A spec that serves one split to every stage leaves nothing held out; an unknown one is refused."""
    assert fit_items(load_split("builtin", "test")[:2], {**BUILTIN_SPLIT, "data": "builtin:train"})[0] == []
    with pytest.raises(Unfittable, match="does not record the data"):
        fit_items([], {"template": DEFAULT_TEMPLATE})
    with pytest.raises(Unfittable, match="training data cannot be read"):
        fit_items([], {**BUILTIN_SPLIT, "data": f"txt:{tmp_path / 'gone.txt'}"})


def _split_of(idiom: str) -> str:
    return next(s for s in ("train", "val", "test") if split_items([split_idiom(idiom)], s))


@pytest.fixture(scope="module")
def file_checkpoint(tiny_gpt2, tmp_path_factory, run_train):
    """A tiny latent trained on a txt file whose val split holds idioms the tiny model completes
    right (their last word is its own completion) and wrong; the file and the ckpt."""
    root = tmp_path_factory.mktemp("file_ckpt")
    items = load_split("builtin", "all")[:160]
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items]
    words = [c.word for c in complete(tiny_gpt2.model, tiny_gpt2.tokenizer, prompts)]
    need = {("val", True): 4, ("val", False): 4, ("train", True): 8, ("train", False): 8, ("test", False): 3}
    chosen = []
    for item, word in zip(items, words, strict=True):
        for idiom, ok in [(item.idiom, word == normalize_word(item.target))] + ([(f"{item.prefix} {word}", True)] if word else []):
            if need.get((_split_of(idiom), ok), 0) > 0:
                need[(_split_of(idiom), ok)] -= 1
                chosen.append(idiom)
                break
    assert not any(need.values()), f"too few candidate idioms: still needed {need}"
    data = root / "latent.txt"
    data.write_text("\n".join(chosen) + "\n")
    config = yaml.safe_load(CONFIGS.joinpath("tiny.yaml").read_text())
    config["data"].update(data=f"txt:{data}", max_items=None)
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(root / "ckpt")
    config["trainer"]["logger"][0]["init_args"]["save_dir"] = str(root / "runs")
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    proc = run_train("fit", "--config", root / "tiny.yaml", "--trainer.max_epochs", "1",
                     "--trainer.enable_progress_bar", "false", cwd=root)
    ckpt = root / "ckpt" / "last.ckpt"
    assert proc.returncode == 0 and ckpt.is_file(), proc.stderr[-3000:]
    return data, ckpt


def test_evaluate_with_a_checkpoint_fits_the_probe_on_its_val_split_on_any_file(
    file_checkpoint, tmp_path, capsys, monkeypatch
):
    """A user's file with --split all (the probe used to vanish): fitted on the checkpoint's
    held-out idioms less the evaluated ones, some of which are written differently."""
    from vtrans.evaluation import fitted as fitted_module
    from vtrans.latent import checkpoint

    seen_features: list[list[str]] = []
    features = fitted_module.fit_features

    def spy(*args, **kwargs):
        got = features(*args, **kwargs)
        seen_features.append(list(got))
        return got

    monkeypatch.setattr(fitted_module, "fit_features", spy)

    data, ckpt = file_checkpoint
    assert checkpoint.read(ckpt)["datamodule_hyper_parameters"]["data"] == f"txt:{data}"
    val = load_split(f"txt:{data}", "val")
    evaluated = [_rewritten(it.idiom) for it in val[:3]] + [it.idiom for it in load_split("builtin", "test")[:5]]
    user_file = tmp_path / "mine.txt"
    user_file.write_text("\n".join(evaluated) + "\n")
    out = tmp_path / "run"
    main(["evaluate", "--ckpt", str(ckpt), "--data", f"txt:{user_file}", "--split", "all", "--n_boot", "100",
          "--estimators", "probe", "--out", str(out), "--quiet"])
    assert capsys.readouterr().err == ""
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert list(results["estimators"]) == ["probe"] and results["dropped"] == {}
    assert results["n"] == len(rows) == len(evaluated)
    assert all(0 <= r["scores"]["probe"] <= 1 for r in rows)
    assert results["probe_fit"]["n"] == len(val) - 3  # the evaluated idioms are out of its fitting set
    assert f"val split of txt:{data}" in results["probe_fit"]["source"]
    assert {"posterior_var", "latent_kl"} <= set(seen_features[0])  # its features include the latent's, none asked for
    assert f"probe was fitted on {len(val) - 3} items" in (out / "report.md").read_text()


def test_probe_is_dropped_when_every_held_out_idiom_is_evaluated(file_checkpoint, tmp_path, capsys):
    data, ckpt = file_checkpoint
    out = tmp_path / "run"
    main(["evaluate", "--ckpt", str(ckpt), "--data", f"txt:{data}", "--split", "all", "--n_boot", "100",
          "--estimators", "msp,probe", "--out", str(out)])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: "))
    results = json.loads((out / "results.json").read_text())
    assert list(results["estimators"]) == ["msp"]
    assert results["probe_fit"]["n"] == 0
    assert "no item of the val split" in results["dropped"]["probe"] and "evaluated" in results["dropped"]["probe"]
    assert err.count("warning: not run") == 1 and "warning: not run: probe: cannot be fitted" in err
    assert (results["seen_left_out"], results["seen_of"]) == (16, 27)  # the training idioms, not scored
