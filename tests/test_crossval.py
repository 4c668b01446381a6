"""``vtrans crossval``: folds, out-of-fold training, the cross-fitted probe, seeds, the files.

A random tiny model almost never completes an idiom, so the data file here ends half of its
idioms with the tiny model's own greedy completion word: both classes exist and AUROC is
defined.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

import vtrans.crossval as crossval_module
from vtrans.cli import main
from vtrans.crossval import CrossvalConfig, assign_folds, read_training_config
from vtrans.data import (
    DEFAULT_TEMPLATE,
    _idiom_key,
    load_idioms,
    normalize_word,
    render_prompt,
)
from vtrans.datamodule import IdiomDataModule
from vtrans.errors import ConfigError
from vtrans.estimators import probe
from vtrans.generate import complete
from vtrans.loading import Backbone

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory) -> Path:
    """30 idioms: every other one ends with the tiny model's own completion word (correct)."""
    gpt2 = Backbone("tiny-gpt2")
    assert gpt2.model.config.n_layer == 4
    items = load_idioms("builtin")[:80]
    prompts = [render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items]
    words = [c.word for c in complete(gpt2.model, gpt2.tokenizer, prompts)]
    lines, n_right = [], 0
    for item, word in zip(items, words, strict=True):
        if word and word != normalize_word(item.target) and n_right <= len(lines) // 2:
            lines.append(f"{item.prefix} {word}")
            n_right += 1
        elif word != normalize_word(item.target):
            lines.append(item.idiom)
        if len(lines) == 30:
            break
    assert len(lines) == 30 and 10 <= n_right <= 20
    path = tmp_path_factory.mktemp("cv") / "mixed.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(args: list, capsys, quiet: bool = True) -> tuple[str, str]:
    main(["crossval", *map(str, args), *(["--quiet"] if quiet else [])])
    captured = capsys.readouterr()
    return captured.out, captured.err


# --------------------------------------------------------------------------- folds


def test_folds_are_balanced_deterministic_and_independent_of_file_order():
    items = load_idioms("builtin")[:103]
    folds = assign_folds(items, 5, seed=0)
    sizes = [folds.count(f) for f in range(5)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    by_idiom = dict(zip((it.idiom for it in items), folds, strict=True))
    assert [by_idiom[it.idiom] for it in shuffled] == assign_folds(shuffled, 5, seed=0)
    assert assign_folds(items, 5, seed=1) != folds


def test_training_config_is_read_and_checked(tmp_path):
    spec = read_training_config(TINY)
    assert spec.backbone == {"name": "tiny-gpt2"} and spec.model["d_z"] == 8 and spec.max_epochs == 3
    bad = yaml.safe_load(TINY.read_text())
    bad["model"]["not_a_setting"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="not_a_setting"):
        read_training_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        read_training_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folds", "1"], "extra_train"),
        (["--folds", "0"], "folds must be >= 1"),
        (["--seeds", "1,1"], "distinct"),
        (["--data", "builtin:test"], "every idiom of a set"),
        (["--train_config", "nowhere.yaml"], "not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["crossval", "--train_config", str(TINY), "--out", str(tmp_path / "cv"), "--quiet", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err.replace("-", "_"), err  # flags, however spelt


# --------------------------------------------------------------------------- the run


@pytest.mark.slow
def test_crossval_scores_every_item_out_of_fold(mixed_file, tmp_path, capsys, monkeypatch):
    trained_on: list[set[str]] = []
    real_from_items = IdiomDataModule.from_items.__func__

    def recording(cls, train, *args, **kwargs):
        trained_on.append({_idiom_key(it.idiom) for it in train})
        return real_from_items(cls, train, *args, **kwargs)

    monkeypatch.setattr(IdiomDataModule, "from_items", classmethod(recording))
    fitted_on: list[int] = []
    real_fit = probe.fit

    def fit_recording(x, errors, names, *args, **kwargs):
        fitted_on.append(x.shape[0])
        return real_fit(x, errors, names, *args, **kwargs)

    monkeypatch.setattr(probe, "fit", fit_recording)
    out = tmp_path / "cv"
    names = ["msp", "entropy", "lens_ce", "posterior_var", "latent_mi", "latent_kl", "probe"]
    stdout, _ = run_cli(
        ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "3", "--seeds", "0,1", "--epochs", "1",
         "--samples", "4", "--n_boot", "100", "--estimators", ",".join(names), "--out", out,
         "--markdown", tmp_path / "docs" / "results.md"],
        capsys,
    )
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert len(rows) == 30 == results["n"]
    # every scored idiom's latent never saw it: fold f's training set excludes exactly fold f
    assert len(trained_on) == 3 * 2
    for k, train in enumerate(trained_on):
        fold = k % 3
        scored = {_idiom_key(r["idiom"]) for r in rows if r["fold"] == fold}
        outside = {_idiom_key(r["idiom"]) for r in rows if r["fold"] != fold}
        assert train == outside and not train & scored
    # the probe of each fold is fitted on the items outside it only
    sizes = sorted({sum(r["fold"] != f for r in rows) for f in range(3)})
    assert sorted(set(fitted_on)) == sizes and len(fitted_on) == 3 * 2
    for name in names:
        entry = results["estimators"][name]
        assert entry["n"] == 30 and len(entry["seeds"]["auroc"]) == 2
        assert all(math.isfinite(r["scores"][name]) for r in rows)
    assert results["reference"] in ("msp", "entropy")
    # the first seed's scores are the row's; the others are kept by seed; the z draws differ by seed
    assert all(set(r["scores_by_seed"]) == {"1"} for r in rows)
    assert any(r["scores"]["latent_mi"] != r["scores_by_seed"]["1"]["latent_mi"] for r in rows)
    assert all(r["scores"]["msp"] == r["scores_by_seed"]["1"]["msp"] for r in rows)  # deterministic: run once
    assert results["protocol"]["folds"] == 3 and results["protocol"]["seeds"] == [0, 1]
    for plot in ("roc.png", "auroc_forest.png", "risk_coverage.png", "lens_by_layer.png"):
        assert (out / plot).is_file()
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "](../cv/auroc_forest.png)" in md and "30 idioms" in md
    assert "posterior_var" in stdout and "AUROC over seeds" in stdout


@pytest.mark.slow
def test_one_fold_trains_on_the_extra_idioms_without_the_scored_ones(mixed_file, tmp_path, capsys, monkeypatch):
    trained_on: list[set[str]] = []
    real_from_items = IdiomDataModule.from_items.__func__

    def recording(cls, train, *args, **kwargs):
        trained_on.append({_idiom_key(it.idiom) for it in train})
        return real_from_items(cls, train, *args, **kwargs)

    monkeypatch.setattr(IdiomDataModule, "from_items", classmethod(recording))
    extra = tmp_path / "extra.txt"
    scored = mixed_file.read_text().splitlines()
    extra.write_text("\n".join(scored[:5] + [it.idiom for it in load_idioms("builtin")[200:240]]) + "\n")
    out = tmp_path / "cv1"
    _, stderr = run_cli(
        ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--extra_train", f"txt:{extra}", "--folds", "1",
         "--seeds", "0", "--epochs", "1", "--samples", "4", "--n_boot", "100",
         "--estimators", "msp,posterior_var,probe", "--out", out],
        capsys,
        quiet=False,
    )
    results = json.loads((out / "results.json").read_text())
    assert len(trained_on) == 1
    assert trained_on[0] == {_idiom_key(it.idiom) for it in load_idioms("builtin")[200:240]}
    assert results["protocol"]["n_extra_train"] == 40
    assert "probe" in results["dropped"] and "probe" in stderr
    assert results["estimators"]["posterior_var"]["n"] == 30


def test_the_probe_is_cross_fitted(monkeypatch):
    """Fold f's probe never sees fold f's rows: a feature that leaks fold f's labels would betray it."""

    class Fake:
        folds = [0, 1, 0, 1, 0, 1, 0, 1]
        cfg = CrossvalConfig(config=str(TINY), folds=2, seeds=[0])

    correct = [True, False, False, True, True, True, False, False]
    seen: list[torch.Tensor] = []
    real_fit = probe.fit

    def recording(x, errors, names, *args, **kwargs):
        seen.append(x[:, 0].clone())
        return real_fit(x, errors, names, *args, **kwargs)

    monkeypatch.setattr(probe, "fit", recording)
    lens = torch.arange(8, dtype=torch.float32).view(8, 1) * torch.ones(1, 3)
    scores = {"msp": torch.rand(8), "entropy": torch.rand(8)}
    out = crossval_module.CrossFit._probe(Fake(), scores, lens, correct)
    assert out.shape == (8,) and torch.isfinite(out).all()
    assert [sorted(s.tolist()) for s in seen] == [[1.0, 3.0, 5.0, 7.0], [0.0, 2.0, 4.0, 6.0]]


@pytest.mark.slow
def test_self_targets_add_the_models_own_wrong_answers_of_training_prompts_only(mixed_file, tmp_path, capsys, monkeypatch):
    trained_on: list[list] = []
    real_from_items = IdiomDataModule.from_items.__func__

    def recording(cls, train, *args, **kwargs):
        trained_on.append(list(train))
        return real_from_items(cls, train, *args, **kwargs)

    monkeypatch.setattr(IdiomDataModule, "from_items", classmethod(recording))
    out = tmp_path / "cv-self"
    run_cli(
        ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "1",
         "--samples", "4", "--n_boot", "100", "--estimators", "msp,posterior_var", "--self_targets", "--out", out],
        capsys,
    )
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert json.loads((out / "results.json").read_text())["protocol"]["self_targets"] is True
    for fold, train in enumerate(trained_on):
        outside = [r for r in rows if r["fold"] != fold]
        expected = {(r["prompt"], r["target"]) for r in outside}
        expected |= {(r["prompt"], r["completion_word"]) for r in outside if not r["correct"] and r["completion_word"]}
        got = {(render_prompt(DEFAULT_TEMPLATE, it.prefix), it.target) for it in train}
        assert got == expected
        assert len(train) > len(outside)  # the wrong answers were added


def test_each_estimator_is_charged_what_it_needs_alone():
    from vtrans.evaluate import costs

    seconds = {"forward": 2.0, "shared": 3.0, "latent_mi": 8.0, "sampling": 5.0, "probe_fit": 4.0}
    names = ["msp", "lens_ce", "posterior_var", "latent_kl", "latent_mi", "sample_disagreement", "probe"]
    got = costs(seconds, names)
    for name in ("msp", "lens_ce", "posterior_var", "latent_kl"):  # the shared forward, with every read off it
        assert got[name]["cost_forward_equiv"] == 1.5
    assert got["latent_mi"]["seconds"] == 3.0 + 8.0  # the forward its samples start from, and the samples
    assert got["sample_disagreement"]["seconds"] == 5.0  # reads the completions, not the forward
    assert got["probe"]["seconds"] == 3.0 + 4.0  # its features' forward and its fit


def test_latents_loaded_from_checkpoints_score_as_the_run_that_trained_them(mixed_file, tmp_path, capsys):
    first, again = tmp_path / "cv", tmp_path / "again"
    common = ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "1",
              "--samples", "4", "--n_boot", "100"]
    run_cli([*common, "--estimators", "msp,posterior_var,latent_kl", "--save_checkpoints", "--out", first], capsys)
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["seed0-fold0.ckpt", "seed0-fold1.ckpt"]
    # new estimators on the same latents, no training: the old ones come out unchanged
    run_cli([*common, "--estimators", "msp,posterior_var,latent_kl,latent_mi,latent_nll",
             "--from_checkpoints", first / "checkpoints", "--out", again], capsys)
    old = [json.loads(line) for line in (first / "scores.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (again / "scores.jsonl").read_text().splitlines()]
    for a, b in zip(old, new, strict=True):
        assert a["idiom"] == b["idiom"] and a["fold"] == b["fold"]
        for name in ("posterior_var", "latent_kl"):
            assert b["scores"][name] == pytest.approx(a["scores"][name], rel=1e-5, abs=1e-7)
        assert math.isfinite(b["scores"]["latent_nll"]) and b["scores"]["latent_mi"] >= 0
    results = json.loads((again / "results.json").read_text())
    assert results["protocol"]["from_checkpoints"] == str(first / "checkpoints")
    assert "loaded from" in (again / "report.md").read_text()


def test_a_checkpoint_of_other_folds_is_refused(mixed_file, tmp_path, capsys):
    first = tmp_path / "cv"
    common = ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "1",
              "--samples", "4", "--n_boot", "100", "--estimators", "msp,posterior_var"]
    run_cli([*common, "--save_checkpoints", "--out", first], capsys)
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*common, "--fold_seed", "1", "--from_checkpoints", first / "checkpoints", "--out", tmp_path / "x"], capsys)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was not trained on this fold's" in err and "fold_seed" in err.replace("-", "_")
    assert not (tmp_path / "x" / "results.json").exists()
