"""``vtrans evaluate``: the contract's files, the probe's data, the failure paths.

A random tiny model almost never completes an idiom, so one data file here is made of
idioms whose last word *is* the tiny model's own greedy completion for half of the items:
both classes exist, AUROC is defined and the probe can be fitted.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
import yaml
from torch.testing import assert_close

import vtrans.evaluation.evaluate as evaluate_module
import vtrans.evaluation.fitted as fitted_module
from vtrans import log
from vtrans.backbone.generate import complete
from vtrans.backbone.loading import Backbone
from vtrans.cli import main
from vtrans.config import EvalConfig
from vtrans.data import DEFAULT_TEMPLATE, load_split, normalize_word, render_prompt, split_idiom, split_items
from vtrans.estimators.runner import Runner
from vtrans.evaluation.fitted import fit_items
from vtrans.evaluation.items import SEPARATING_HALF_WIDTH, auroc_half_width
from vtrans.evaluation.scored import score_items
from vtrans.latent.model import LatentModel

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = {"idiom", "prompt", "target", "completion", "correct", "scores", "lens_ce_by_layer"}
METRIC_KEYS = {"auroc", "auroc_ci", "auprc", "prr", "aurc", "cost_forward_equiv", "seconds"}
SINGLE_AND_DROPOUT = [
    "msp",
    "entropy",
    "lens_ce",
    "lens_area",
    "attention_entropy",
    "mc_dropout_var",
    "mc_dropout_entropy",
    "mc_dropout_mi",
]
N_LAYERS = 4  # tiny-gpt2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt2() -> Backbone:
    backbone = Backbone("tiny-gpt2")
    assert backbone.model.config.n_layer == N_LAYERS
    return backbone


@pytest.fixture(scope="module")
def idiom_files(gpt2, tmp_path_factory) -> dict:
    """Two txt data files built from the tiny model's own greedy completions.

    ``mixed``: idioms that end with the model's completion word (correct) and idioms that end
    with their real last word (wrong), chosen so that the test split holds 6 of each and the
    train split 10 of each. ``wrong``: 30 idioms the model completes wrongly.
    """
    folder = tmp_path_factory.mktemp("idioms")
    items = load_split("builtin", "all")[:120]
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items]
    words = [c.word for c in complete(gpt2.model, gpt2.tokenizer, prompts)]
    need = {("test", True): 6, ("test", False): 6, ("train", True): 10, ("train", False): 10}
    mixed, correct, wrong = [], set(), []
    for item, word in zip(items, words, strict=True):
        if word == normalize_word(item.target):
            continue  # the model got a real idiom right: neither file wants it
        wrong.append(item.idiom)
        options = [(item.idiom, False)] + ([(f"{item.prefix} {word}", True)] if word else [])
        for idiom, ok in options:
            split = next(s for s in ("train", "val", "test") if split_items([split_idiom(idiom)], s))
            if need.get((split, ok), 0) > 0:
                need[(split, ok)] -= 1
                mixed.append(idiom)
                if ok:
                    correct.add(idiom)
                break
    assert not any(need.values()), f"too few candidate idioms: still needed {need}"
    (folder / "mixed.txt").write_text("\n".join(mixed) + "\n")
    (folder / "wrong.txt").write_text("\n".join(wrong[:30]) + "\n")
    return {"mixed": folder / "mixed.txt", "wrong": folder / "wrong.txt", "correct": correct}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """``train.py fit --config configs/tiny.yaml`` for one epoch, writing into a temporary folder."""
    root = tmp_path_factory.mktemp("fit")
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(root / "ckpt")
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(root / "runs")
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(root / "tiny.yaml"),
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ckpt = root / "ckpt" / "last.ckpt"
    assert proc.returncode == 0 and ckpt.is_file(), proc.stderr[-3000:]
    return ckpt


def run_cli(args: list[str], capsys, quiet: bool = True) -> tuple[str, str]:
    """``vtrans evaluate ARGS`` (``--quiet`` unless told): stdout and stderr."""
    main(["evaluate", *map(str, args), *(["--quiet"] if quiet else [])])
    captured = capsys.readouterr()
    return captured.out, captured.err


def not_run(stderr: str) -> list[str]:
    """The lines that say an estimator asked for was not run."""
    return [line for line in stderr.splitlines() if line.startswith("warning: not run")]


def read_outputs(out: Path) -> tuple[dict, list[dict], str]:
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return results, rows, (out / "report.md").read_text()


def check_contract(out: Path, names: list[str], n: int, model: str = "tiny-gpt2") -> tuple[dict, list[dict]]:
    """results.json, scores.jsonl, report.md and plots exactly as design.md says."""
    results, rows, report = read_outputs(out)
    assert results["model"] == model and results["n"] == n
    assert len(rows) == n
    errors = [not r["correct"] for r in rows]
    assert results["accuracy"] == pytest.approx(1 - sum(errors) / n)
    assert list(results["estimators"]) == names
    for name, m in results["estimators"].items():
        assert METRIC_KEYS <= set(m), name
        for key in ("auroc", "auprc", "prr", "aurc"):
            assert m[key] is None or isinstance(m[key], float), (name, key)  # NaN is written as null
        assert isinstance(m["auroc_ci"], list) and len(m["auroc_ci"]) == 2
        assert m["cost_forward_equiv"] > 0 and m["seconds"] > 0
        assert f"| {name} |" in report
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert isinstance(row["correct"], bool)
        assert list(row["scores"]) == names
        assert all(isinstance(v, float) and math.isfinite(v) for v in row["scores"].values())
        assert len(row["lens_ce_by_layer"]) == N_LAYERS + 1
        assert row["idiom"].endswith(row["target"])
        assert row["prompt"] == DEFAULT_TEMPLATE.format(prefix=row["idiom"][: -len(row["target"])].strip())
        assert row["correct"] == (normalize_word(row["target"]) == _first_word(row["completion"]))
        if "lens_ce" in row["scores"]:
            assert row["scores"]["lens_ce"] == pytest.approx(row["lens_ce_by_layer"][-1])
    plots = [line.split("(")[-1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert {"lens_by_layer.png", "histograms.png", "risk_coverage.png"} <= set(plots)
    if 0 < sum(errors) < n:
        assert "roc.png" in plots
    for plot in plots:
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    return results, rows


def _first_word(text: str) -> str:
    from vtrans.data import first_word

    return first_word(text)


def auroc_by_hand(scores: list[float], errors: list[bool]) -> float:
    pos = [s for s, e in zip(scores, errors, strict=True) if e]
    neg = [s for s, e in zip(scores, errors, strict=True) if not e]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_evaluate_builtin_writes_the_contract_and_never_reads_the_train_split(tmp_path, capsys, monkeypatch):
    asked = []
    real_load_split = evaluate_module.load_split

    def recording_load_split(spec, split=None, *args, **kwargs):
        asked.append((spec, split))
        return real_load_split(spec, split, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "load_split", recording_load_split)
    monkeypatch.setattr(fitted_module, "load_split", recording_load_split)  # where a fitted estimator's items come from
    out = tmp_path / "run"
    stdout, stderr = run_cli(
        ["--model", "tiny-gpt2", "--data", "builtin", "--max_items", "12", "--n_boot", "100", "--passes", "3", "--samples", "3",
         "--estimators", ",".join(SINGLE_AND_DROPOUT), "--out", out],
        capsys,
    )
    results, rows = check_contract(out, SINGLE_AND_DROPOUT, 12)
    assert asked == [("builtin", "test")]  # no probe: the train split is never loaded
    assert results["dropped"] == {}
    assert "warning" not in stderr
    assert "lens_ce" in stdout and "results.json" in stdout
    test_idioms = {it.idiom for it in load_split("builtin", "test")}
    assert {r["idiom"] for r in rows} <= test_idioms
    for row in rows:  # msp and lens_ce read the same p(ŷ)
        assert math.exp(-row["scores"]["lens_ce"]) == pytest.approx(1 - row["scores"]["msp"], abs=1e-5)


@pytest.mark.slow
def test_evaluate_with_both_classes_and_a_probe(idiom_files, tmp_path, capsys, monkeypatch):
    calls = {"label": 0, "forward": 0, "features": 0}

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(Runner, "label", counting("label", Runner.label))
    monkeypatch.setattr(Runner, "plain_forward_seconds", counting("forward", Runner.plain_forward_seconds))
    features = fitted_module.fit_features
    monkeypatch.setattr(fitted_module, "fit_features", lambda *a, **k: (calls.__setitem__("features", calls["features"] + 1), features(*a, **k))[1])
    names = ["msp", "lens_ce", "mc_dropout_mi", "probe"]
    out = tmp_path / "run"
    _, stderr = run_cli(
        ["--model", "tiny-gpt2", "--data", f"txt:{idiom_files['mixed']}", "--split", "test", "--n_boot", "100",
         "--passes", "2", "--estimators", ",".join([*names, "posterior_var"]), "--out", out],
        capsys,
        quiet=False,
    )
    test_items = load_split(f"txt:{idiom_files['mixed']}", "test")
    results, rows = check_contract(out, names, len(test_items))
    # each split completed once; the plain forward (the unit of cost) only on the evaluated split
    assert calls == {"label": 2, "forward": 1, "features": 1}
    assert [r["correct"] for r in rows] == [it.idiom in idiom_files["correct"] for it in test_items]
    errors = [not r["correct"] for r in rows]
    for name in names:
        assert results["estimators"][name]["auroc"] == pytest.approx(
            auroc_by_hand([r["scores"][name] for r in rows], errors)
        )
    assert all(0 <= r["scores"]["probe"] <= 1 for r in rows)
    # no checkpoint: fitted on the built-in train and val splits (none of the evaluated idioms is there)
    n_fit = len(load_split("builtin", "train")) + len(load_split("builtin", "val"))
    assert results["probe_fit"] == {"source": "builtin:train+val", "n": n_fit}
    assert (out / "roc.png").is_file()
    # a latent estimator without a latent: not run, said on stderr and in results.json
    assert results["dropped"] == {"posterior_var": "needs a trained latent (--ckpt)"}
    assert len(not_run(stderr)) == 1 and "posterior_var" in not_run(stderr)[0]


@pytest.mark.slow
def test_evaluate_latent_checkpoint_with_an_unfittable_probe(tiny_checkpoint, idiom_files, tmp_path, capsys):
    from vtrans.latent import checkpoint

    names = ["posterior_var", "latent_mi", "latent_kl", "lens_ce"]
    out = tmp_path / "run"
    _, stderr = run_cli(
        ["--ckpt", tiny_checkpoint, "--data", f"txt:{idiom_files['wrong']}", "--n_boot", "100", "--samples", "3",
         "--estimators", ",".join([*names, "probe"]), "--out", out],
        capsys,
        quiet=False,
    )
    evaluated = load_split(f"txt:{idiom_files['wrong']}", "test")
    results, rows = check_contract(out, names, len(evaluated))
    # fitted on the checkpoint's held-out idioms (the built-in val split), all completed wrongly
    held_out, _ = fit_items(evaluated, checkpoint.read(tiny_checkpoint)["datamodule_hyper_parameters"])
    assert results["probe_fit"]["n"] == len(held_out) > 0
    assert results["dropped"]["probe"].startswith(f"cannot be fitted: the base model completes 0 of its {len(held_out)}")
    assert len(not_run(stderr)) == 1 and "probe" in not_run(stderr)[0]
    assert results["ckpt"] == str(tiny_checkpoint) and results["latent"]["prior"] == "conditional"
    assert all(r["scores"]["posterior_var"] > 0 and r["scores"]["latent_kl"] >= 0 for r in rows)


def test_probe_features_equal_the_families_run_one_by_one(gpt2, idiom_files):
    """The fused forward of the probe's training split gives the same numbers as the timed families."""
    from vtrans.estimators import probe

    items = load_split(f"txt:{idiom_files['mixed']}", "all")[:10]
    runner = Runner(gpt2, None, EvalConfig(batch_size=4, n_boot=100), progress=False)
    scored = score_items(runner, items, ["probe"], DEFAULT_TEMPLATE, gold=False)
    x, names = probe.features(scored.scores)
    fused, fused_names = probe.features(fitted_module.fit_features(runner, probe.FAMILY, scored.prompts, scored.completions))
    assert fused_names == names == [f"lens_ce_L{i}" for i in range(N_LAYERS + 1)] + ["entropy", "msp", "attention_entropy"]
    assert_close(fused, x, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x).all()


@pytest.mark.slow
def test_evaluate_standard_prior_drops_latent_kl(gpt2, idiom_files, tmp_path, monkeypatch):
    """A latent with the standard prior has no latent_kl: dropped and said so; the others run."""
    from vtrans.evaluation.evaluate import evaluate
    from vtrans.latent import checkpoint
    from vtrans.latent.model import LatentModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LatentModel(gpt2, d_z=4, prior="standard", hidden=16).eval()
    monkeypatch.setattr(checkpoint, "read", lambda path: {})  # no file to read
    monkeypatch.setattr(checkpoint, "load", lambda path, device="cpu", backbone=None, ckpt=None: module)
    monkeypatch.setattr(checkpoint, "trained_idiom_hashes", lambda ckpt: None)
    config = EvalConfig(
        data=f"txt:{idiom_files['mixed']}", estimators=["posterior_var", "latent_mi", "latent_kl"], samples=3, n_boot=100
    )
    results = evaluate(config, tmp_path / "run", ckpt="standard.ckpt", progress=False)
    assert results["dropped"] == {"latent_kl": "needs a latent trained with prior: conditional"}
    check_contract(tmp_path / "run", ["posterior_var", "latent_mi"], len(load_split(config.data, "test")))


def test_eager_attention_is_switched_on_for_the_run_and_back(gpt2):
    from vtrans.backbone.architectures import attention_implementation
    from vtrans.backbone.tokens import encode
    from vtrans.estimators import attention

    model = gpt2.model
    enc = encode(gpt2.tokenizer, ["Complete the idiom: a piece of"], [[0]])
    model.set_attn_implementation("sdpa")
    try:
        with attention_implementation(model, "eager"):
            assert model.config._attn_implementation == "eager"
            assert torch.isfinite(attention.scores(model, enc)["attention_entropy"]).all()
        assert model.config._attn_implementation == "sdpa"
        with pytest.raises(KeyError), attention_implementation(model, "eager"):
            raise KeyError("inside")
        assert model.config._attn_implementation == "sdpa"
    finally:
        model.set_attn_implementation("eager")


# --------------------------------------------------------------------------- what the run says, and when


@pytest.fixture
def stderr(capsys):
    """The vtrans logger set up as the command line sets it, its stderr captured; put back after."""
    saved = log.log.handlers[:], log.log.level, log.log.propagate, dict(log._state)
    log.setup(quiet=False)
    yield capsys
    log.log.handlers[:], log.log.level, log.log.propagate = saved[:3]
    log._state.update(saved[3])


def _marking(monkeypatch, owner, name: str, mark: str) -> None:
    """``owner.name`` writes ``mark`` (with its first argument's length, if a list) on stderr, then runs."""
    real = getattr(owner, name)

    def marked(*args, **kwargs):
        sized = [a for a in args if isinstance(a, list)]
        print(f"<{mark}{' ' + str(len(sized[0])) if sized else ''}>", file=sys.stderr)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, marked)


def _in_order(text: str, *parts: str) -> None:
    at = [text.index(part) for part in parts]
    assert at == sorted(at), list(zip(parts, at, strict=True))


def test_auroc_half_width_matches_the_bootstrap_on_synthetic_data():
    """Scores N(0, 1) for correct items and N(d, 1) for errors, with d set for AUROC 0.75.

    Hanley-McNeil's half-width against (a) 1.96 x the spread of the AUROC over 300 fresh draws and
    (b) the mean half-width of vtrans.evaluation.metrics' percentile bootstrap over 20 draws. Tolerance 15%:
    (a) carries ~4% sampling error (1/sqrt(2 x 299)), (b) ~2%, and Hanley-McNeil's closed forms,
    exact for exponential scores, run up to ~10% wide of normal scores when the classes are unequal.
    """
    from vtrans.evaluation import metrics

    shift = math.sqrt(2) * NormalDist().inv_cdf(0.75)  # P(N(d,1) > N(0,1)) = Φ(d / √2) = 0.75
    rng = np.random.default_rng(0)
    for n, rate in ((86, 0.5), (200, 0.3)):
        n_wrong = round(rate * n)
        errors = np.repeat([1, 0], [n_wrong, n - n_wrong])
        draws = [rng.normal(size=n) + shift * errors for _ in range(300)]
        aurocs = np.array([metrics.auroc(s, errors) for s in draws])
        boot = [metrics.bootstrap_ci(metrics.auroc, s, errors, n_boot=500, seed=i) for i, s in enumerate(draws[:20])]
        expected = auroc_half_width(n, n_wrong / n)
        assert aurocs.mean() == pytest.approx(0.75, abs=0.01)
        assert 1.96 * aurocs.std(ddof=1) == pytest.approx(expected, rel=0.15)
        assert np.mean([(hi - lo) / 2 for lo, hi in boot]) == pytest.approx(expected, rel=0.15)


def test_auroc_half_width_at_the_sizes_users_meet():
    assert auroc_half_width(86) == pytest.approx(0.10, abs=0.01)  # design.md: "about ±0.1" on 86 items
    assert auroc_half_width(10) > 0.25  # the 10 items left of a 40-item file: no ranking survives
    assert auroc_half_width(724, 0.55) < SEPARATING_HALF_WIDTH  # the cross-fitted run
    assert auroc_half_width(400) < auroc_half_width(100) < auroc_half_width(25)
    assert auroc_half_width(400) == pytest.approx(auroc_half_width(100) / 2, rel=0.05)  # 1/√n
    assert auroc_half_width(100, 0.1) > auroc_half_width(100, 0.5)  # few errors: wider
    assert math.isinf(auroc_half_width(12, 0.0)) and math.isinf(auroc_half_width(12, 1.0))


@pytest.mark.slow
def test_evaluate_says_what_it_evaluates_before_the_work(idiom_files, tmp_path, stderr, monkeypatch):
    """The items and n, and the warning with its half-width, before the first completion; a line per
    phase with its seconds; the probe's second pass named before it starts; nothing said twice."""
    _marking(monkeypatch, Runner, "label", "completing")
    _marking(monkeypatch, Backbone, "__init__", "loading")
    data = f"txt:{idiom_files['mixed']}"
    n = len(load_split(data, "test"))
    n_fit = len(fit_items(load_split(data, "test"))[0])
    main(["evaluate", "--model", "tiny-gpt2", "--data", data, "--split", "test", "--n_boot", "100",
          "--estimators", "msp,lens_ce,probe", "--out", str(tmp_path / "run")])
    err = stderr.readouterr().err
    announced = f"loaded {n} items of {data} (split test); n = {n} to evaluate"
    warned = f"warning: n = {n} is too small for the AUROC intervals to separate estimators"
    fitting = f"fitting probe on {n_fit} items of builtin:train+val"
    _in_order(
        err, announced, warned, "<loading>", "loaded tiny-gpt2 (", f"<completing {n}>",
        f"completed {n} prompts: 6 wrong (", f"scored {n} items (", fitting, f"<completing {n_fit}>",
        f"completed {n_fit} prompts", "fitted probe (",
    )
    half = float(re.search(r"a 95% interval is about ±([0-9.]+) wide", err).group(1))
    assert half == pytest.approx(auroc_half_width(n), abs=0.005)
    for line in ("loaded tiny-gpt2", f"completed {n} prompts", f"scored {n} items", "fitted probe"):
        assert re.search(re.escape(line) + r"[^\n]* \(\d+\.\d s\)\n", err), line
    assert err.count("too small") == 1 and err.count("95% interval") == 1  # not again once completed


def test_evaluate_announces_the_seen_idioms_before_loading_the_model(gpt2, idiom_files, tmp_path, stderr, monkeypatch):
    """A checkpoint trained on most of a file: how many are left out, and the n that remains, before
    the checkpoint's model is loaded; with --keep_seen, a warning that they are in-sample."""
    from vtrans.data import idiom_hash
    from vtrans.evaluation.evaluate import evaluate
    from vtrans.latent import checkpoint

    data = f"txt:{idiom_files['mixed']}"
    items = load_split(data, "all")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = LatentModel(gpt2, d_z=4, prior="standard", hidden=16).eval()
    monkeypatch.setattr(checkpoint, "read", lambda path: {})  # no file to read
    monkeypatch.setattr(checkpoint, "load", lambda path, device="cpu", backbone=None, ckpt=None: module)
    _marking(monkeypatch, checkpoint, "load", "loading")
    monkeypatch.setattr(checkpoint, "trained_idiom_hashes", lambda ckpt: {idiom_hash(it.idiom) for it in items[5:]})
    config = EvalConfig(data=data, split="all", estimators=["msp", "posterior_var"], n_boot=100)
    results = evaluate(config, tmp_path / "run", ckpt="mine.ckpt", progress=False)
    err = stderr.readouterr().err
    left = len(items) - 5
    _in_order(
        err,
        f"loaded {len(items)} items of {data} (split all); left out {left} of {len(items)} idioms the latent was "
        "trained on (--keep_seen keeps them); n = 5 to evaluate",
        "warning: n = 5 is too small",
        "<loading>",
        "loaded tiny-gpt2 and the latent of mine.ckpt (",
    )
    assert (results["n"], results["seen"], results["seen_left_out"], results["seen_of"]) == (5, left, left, len(items))

    results = evaluate(replace(config, keep_seen=True), tmp_path / "kept", ckpt="mine.ckpt", progress=False)
    err = stderr.readouterr().err
    _in_order(
        err,
        f"n = {len(items)} to evaluate",
        f"warning: kept {left} idioms the latent was trained on (--keep_seen): their latent scores are in-sample",
        "<loading>",
    )
    assert "left out" not in err and results["seen_left_out"] == 0


# --------------------------------------------------------------------------- the probe's data


# --------------------------------------------------------------------------- random weights


def test_evaluate_on_random_weights_says_so_everywhere_and_never_calls_its_accuracy_a_result(tmp_path, capsys):
    out = tmp_path / "run"
    names = ["msp", "entropy", "lens_ce"]
    stdout, _ = run_cli(
        ["--model", "random:tiny-gpt2", "--data", "builtin", "--max_items", "8", "--n_boot", "100",
         "--estimators", ",".join(names), "--out", out],
        capsys,
    )
    label = "random:tiny-gpt2 (random weights)"
    results, rows = check_contract(out, names, 8, model=label)
    assert results["random_weights"] is True and results["accuracy_is_a_result"] is False
    report = (out / "report.md").read_text()
    title, headline = report.splitlines()[0], report.split("\n\n")[1]
    assert title.endswith(label)
    assert "random weights" in headline and "not results" in headline and "accuracy **" not in headline
    assert stdout.startswith(f"{label}: the accuracy and the AUROCs below are not results")


def test_a_trained_models_results_carry_no_random_weights_mark(tmp_path, capsys):
    out = tmp_path / "run"
    run_cli(["--model", "tiny-gpt2", "--data", "builtin", "--max_items", "4", "--n_boot", "100", "--estimators", "msp",
             "--out", out], capsys)
    results, _, report = read_outputs(out)
    assert "random_weights" not in results and "accuracy_is_a_result" not in results
    assert "random weights" not in report and "accuracy **" in report


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--estimators", "msp,bogus"], "unknown estimator(s) bogus"),
        (["--data", "txt:/no/such/idioms.txt"], "/no/such/idioms.txt"),
        (["--template", "Finish this idiom:"], "{prefix}"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--model", "nobody/no-such-model"], "not available offline"),
        (["--model", "random:no-such-model"], "random:gpt2-xl"),
        (["--ckpt", "/no/such/model.ckpt"], "checkpoint not found"),
        (["--max_items", "0"], "max_items must be >= 1"),
        (["--max_items", "1"], "need at least 2"),
        (["--n_boot", "10"], "n_boot must be >= 100"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--out", str(tmp_path / "run"), "--quiet", "--model", "tiny-gpt2", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("vtrans")  # the installed console script
    assert script.is_file(), "vtrans is not installed in this environment: pip install -e ."
    proc = subprocess.run(
        [str(script), "evaluate", "--out", str(tmp_path), "--estimators", "nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: unknown estimator(s) nope") and proc.stderr.count("\n") == 1, proc.stderr


def test_a_new_fitted_family_is_one_entry(idiom_files, tmp_path, monkeypatch):
    """A fitted family added to the registry runs in evaluate like the probe, with no module naming
    it: its features are computed on held-out items, it is fitted there, scores the evaluated items,
    is costed, written and described in the report."""
    from vtrans.estimators import registry
    from vtrans.estimators.base import Family, Fitted, Shown
    from vtrans.evaluation.evaluate import evaluate

    fits: list[tuple[list[str], int]] = []

    def fit(features, errors):
        """The margin, turned round when the training items' errors have the lower margin."""
        fits.append((sorted(features), len(errors)))
        wrong, right = features["margin"][errors == 1].mean(), features["margin"][errors == 0].mean()
        sign = 1.0 if wrong >= right else -1.0
        return lambda other: sign * other["margin"]

    family = Family(
        "signed", {"signed_margin": "the margin, signed on labelled items"}, None,
        reads_forward=False, fitted=Fitted("held-out labelled items", fit, ("margin", "lens_ce_by_layer")),
        shown=Shown(default_score=False),
    )
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, family))
    data = f"txt:{idiom_files['mixed']}"
    out = tmp_path / "run"
    config = EvalConfig(data=data, split="test", n_boot=100, estimators=["msp", "signed_margin"])
    results = evaluate(config, out, model="tiny-gpt2", progress=False)

    n_fit = len(fit_items(load_split(data, "test"))[0])
    assert fits == [(["lens_ce_by_layer", "margin"], n_fit)]  # fitted once, on the held-out items, on its features
    assert results["signed_fit"] == {"source": "builtin:train+val", "n": n_fit}
    assert list(results["estimators"]) == ["msp", "signed_margin"] and results["dropped"] == {}
    assert results["reference"] == "msp"  # the one cheap baseline run
    cost = results["estimators"]["signed_margin"]
    assert cost["seconds"] == pytest.approx(results["seconds"]["shared"] + results["seconds"]["signed_fit"])
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert all(set(r["scores"]) == {"msp", "signed_margin"} and r["lens_ce_by_layer"] for r in rows)
    scores = np.array([r["scores"]["signed_margin"] for r in rows])
    assert np.all(scores <= 1) and np.all(scores >= -1)  # ± a margin
    assert f"The signed_margin was fitted on {n_fit} items of builtin:train+val" in (out / "report.md").read_text()


def test_evaluate_reads_the_checkpoint_once(tiny_ckpt, idiom_files, tmp_path, monkeypatch):
    """The split, the training idioms, the template, the latent and the probe's fitting items all
    come from one read of the file (a CRC check of every member each time it is read)."""
    from vtrans.evaluation.evaluate import evaluate
    from vtrans.latent import checkpoint

    reads, real = [], checkpoint.read
    monkeypatch.setattr(checkpoint, "read", lambda path: reads.append(str(path)) or real(path))
    config = EvalConfig(data=f"txt:{idiom_files['mixed']}", estimators=["msp", "posterior_var", "probe"], samples=2, n_boot=100)
    results = evaluate(config, tmp_path / "run", ckpt=str(tiny_ckpt), progress=False, template="ckpt")
    assert reads == [str(tiny_ckpt)]
    assert results["config"]["template"] == checkpoint.template_in(real(tiny_ckpt))  # the template it records
    assert "posterior_var" in results["estimators"]
