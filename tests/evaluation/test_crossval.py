"""``vtrans crossval``: out-of-fold training, the cross-fitted probe, seeds, the files, resuming.

A random tiny model almost never completes an idiom, so the data file here ends half of its
idioms with the tiny model's own greedy completion word: both classes exist and AUROC is
defined.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from vtrans.backbone.generate import complete
from vtrans.backbone.loading import Backbone
from vtrans.cli import main
from vtrans.data import DEFAULT_TEMPLATE, load_idioms, normalize_word, render_prompt
from vtrans.data.items import idiom_key
from vtrans.estimators import probe, registry
from vtrans.evaluation.fitted import cross_fitted
from vtrans.evaluation.folds import FoldLatents
from vtrans.latent.datamodule import IdiomDataModule

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--folds", "1"], "extra_train"),
        (["--folds", "0"], "folds must be >= 1"),
        (["--seeds", "1,1"], "distinct"),
        (["--data", "builtin:test"], "every idiom of a set"),
        (["--train_config", "nowhere.yaml"], "not found"),
        (["--ensemble", "0"], "ensemble must be >= 1"),
        (["--seeds", "0,1000", "--ensemble", "2"], "member m of seed s"),
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
        trained_on.append({idiom_key(it.idiom) for it in train})
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
        scored = {idiom_key(r["idiom"]) for r in rows if r["fold"] == fold}
        outside = {idiom_key(r["idiom"]) for r in rows if r["fold"] != fold}
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
    # where it ran: a trained latent's last bits depend on the thread count (its summation order)
    assert results["computed_with"] == [{"threads": torch.get_num_threads(), "torch": torch.__version__}]
    for plot in ("roc.png", "auroc_forest.png", "risk_coverage.png", "lens_by_layer.png"):
        assert (out / plot).is_file()
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "](../cv/auroc_forest.png)" in md and "30 idioms" in md
    assert f"({torch.get_num_threads()} thread(s), torch {torch.__version__})." in md
    assert "posterior_var" in stdout and "AUROC over seeds" in stdout


@pytest.mark.slow
def test_one_fold_trains_on_the_extra_idioms_without_the_scored_ones(mixed_file, tmp_path, capsys, monkeypatch):
    trained_on: list[set[str]] = []
    real_from_items = IdiomDataModule.from_items.__func__

    def recording(cls, train, *args, **kwargs):
        trained_on.append({idiom_key(it.idiom) for it in train})
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
    assert trained_on[0] == {idiom_key(it.idiom) for it in load_idioms("builtin")[200:240]}
    assert results["protocol"]["n_extra_train"] == 40
    assert "probe" in results["dropped"] and "probe" in stderr
    assert results["estimators"]["posterior_var"]["n"] == 30


def test_the_probe_is_cross_fitted(monkeypatch):
    """Fold f's probe never sees fold f's rows: a feature that leaks fold f's labels would betray it."""
    folds = [0, 1, 0, 1, 0, 1, 0, 1]
    correct = [True, False, False, True, True, True, False, False]
    seen: list[torch.Tensor] = []
    real_fit = probe.fit

    def recording(x, errors, names, *args, **kwargs):
        seen.append(x[:, 0].clone())
        return real_fit(x, errors, names, *args, **kwargs)

    monkeypatch.setattr(probe, "fit", recording)
    lens = torch.arange(8, dtype=torch.float32).view(8, 1) * torch.ones(1, 3)
    scores = {"msp": torch.rand(8), "entropy": torch.rand(8)}
    out = cross_fitted(probe.FAMILY, {**scores, "lens_ce_by_layer": lens}, correct, folds, 2)
    assert out.shape == (8,) and torch.isfinite(out).all()
    assert [sorted(s.tolist()) for s in seen] == [[1.0, 3.0, 5.0, 7.0], [0.0, 2.0, 4.0, 6.0]]


def test_any_fitted_family_is_cross_fitted_on_its_features():
    """A fitted family's fit sees its own features of the other folds only; a fold whose outside
    is all of one class gets NaN."""
    from vtrans.estimators.base import Family, Fitted

    seen: list[tuple[list[str], list[float]]] = []

    def fit(features, errors):
        seen.append((sorted(features), features["msp"].tolist()))
        if errors.min() == errors.max():
            raise ValueError("one class")
        return lambda other: other["msp"] + 1

    family = Family("plus", {"msp_plus": "msp + 1"}, None, fitted=Fitted("items", fit, ("msp",)))
    scores = {"msp": torch.arange(6, dtype=torch.float32), "entropy": torch.zeros(6)}
    folds, correct = [0, 1, 2, 0, 1, 2], [True, False, True, True, True, True]
    out = cross_fitted(family, scores, correct, folds, 3)
    assert seen == [(["msp"], [1.0, 2.0, 4.0, 5.0]), (["msp"], [0.0, 2.0, 3.0, 5.0]), (["msp"], [0.0, 1.0, 3.0, 4.0])]
    assert out[[0, 2, 3, 5]].tolist() == [1.0, 3.0, 4.0, 6.0] and out[[1, 4]].isnan().all()


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
    from vtrans.evaluation.scored import costs

    seconds = {"forward": 2.0, "shared": 3.0, "latent_mi": 8.0, "sampling": 5.0, "probe_fit": 4.0}
    names = ["msp", "lens_ce", "posterior_var", "latent_kl", "latent_mi", "sample_disagreement", "cocoa", "probe"]
    got = costs(seconds, names)
    for name in ("msp", "lens_ce", "posterior_var", "latent_kl"):  # the shared forward, with every read off it
        assert got[name]["cost_forward_equiv"] == 1.5
    assert got["latent_mi"]["seconds"] == 3.0 + 8.0  # the forward its samples start from, and the samples
    assert got["sample_disagreement"]["seconds"] == 5.0  # reads the completions, not the forward
    assert got["cocoa"]["seconds"] == 3.0 + 5.0  # of the same family, it reads the forward too
    assert got["probe"]["seconds"] == 3.0 + 4.0  # its features' forward and its fit


def test_latents_loaded_from_checkpoints_score_as_the_run_that_trained_them(mixed_file, tmp_path, capsys):
    first, again = tmp_path / "cv", tmp_path / "again"
    common = ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "1",
              "--samples", "4", "--n_boot", "100"]
    run_cli([*common, "--estimators", "msp,posterior_var,latent_kl", "--save_checkpoints", "--out", first], capsys)
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["seed0-fold0.ckpt", "seed0-fold1.ckpt"]
    # new estimators on the same latents, no training: the old ones come out unchanged
    run_cli([*common, "--estimators", "msp,posterior_var,latent_kl,latent_mi,latent_nll,probe_latent",
             "--from_checkpoints", first / "checkpoints", "--out", again], capsys)
    old = [json.loads(line) for line in (first / "scores.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (again / "scores.jsonl").read_text().splitlines()]
    for a, b in zip(old, new, strict=True):
        assert a["idiom"] == b["idiom"] and a["fold"] == b["fold"]
        for name in ("posterior_var", "latent_kl"):
            assert b["scores"][name] == pytest.approx(a["scores"][name], rel=1e-5, abs=1e-7)
        assert math.isfinite(b["scores"]["latent_nll"]) and b["scores"]["latent_mi"] >= 0
        assert 0 < b["scores"]["probe_latent"] < 1  # cross-fitted on the other fold, its latent's adapter_nll among its features
    results = json.loads((again / "results.json").read_text())
    assert results["protocol"]["from_checkpoints"] == str(first / "checkpoints")
    assert "loaded from" in (again / "report.md").read_text()


def test_an_ensembles_first_member_is_the_seeds_own_latent_and_the_twin_refuses_a_spread(mixed_file, tmp_path, capsys):
    """``--ensemble 2`` trains one more latent per fold from seed s + 1000 and keeps it; every other
    latent estimator reads member 0, the latent a run without an ensemble trains. The twin's run
    scores ``adapter_nll`` and says why it gives no spread."""
    # three epochs: after one step the prior's mean, where each member's z sits, has not left 0 in either member
    common = ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "3",
              "--samples", "4", "--n_boot", "100"]
    plain, ens, twin = tmp_path / "plain", tmp_path / "ens", tmp_path / "twin"
    run_cli([*common, "--estimators", "msp,latent_nll,adapter_nll", "--out", plain], capsys)
    run_cli([*common, "--estimators", "msp,latent_nll,adapter_nll,ensemble_nll,ensemble_var,ensemble_mi",
             "--ensemble", "2", "--out", ens], capsys)
    assert {p.name for p in (ens / "units").glob("*.ckpt")} == {
        "seed0-fold0.ckpt", "seed0-fold1.ckpt", "seed0-fold0-member1.ckpt", "seed0-fold1-member1.ckpt"}
    a = [json.loads(line) for line in (plain / "scores.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (ens / "scores.jsonl").read_text().splitlines()]
    for x, y in zip(a, b, strict=True):
        for name in ("latent_nll", "adapter_nll"):  # the same latent, trained from the same seed on the same items
            assert y["scores"][name] == x["scores"][name]
        assert y["scores"]["ensemble_var"] >= 0 and y["scores"]["ensemble_mi"] >= 0
    assert any(y["scores"]["ensemble_mi"] > 0 for y in b)  # two seeds, two latents: they disagree somewhere
    results = json.loads((ens / "results.json").read_text())
    assert [e["latents"] for e in results["fold_training"]] == [2, 2]
    run_cli(["--train_config", REPO / "configs" / "tiny-twin.yaml", *common[2:],
             "--estimators", "msp,adapter_nll,latent_nll,posterior_var", "--out", twin], capsys)
    results = json.loads((twin / "results.json").read_text())
    assert "adapter_nll" in results["estimators"] and "latent_nll" not in results["estimators"]
    assert "deterministic twin" in results["dropped"]["latent_nll"]
    assert results["fold_training"][0]["kl"] == 0.0


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


# --------------------------------------------------------------------------- training faults and resuming


def _tiny_with_callback(path: Path, class_path: str, **init_args) -> Path:
    """tiny.yaml with one more training callback; a fold trains with the YAML's callbacks, as train.py does."""
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["callbacks"].append({"class_path": class_path, "init_args": init_args})
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_nan_in_a_fold_stops_the_run_with_one_line_naming_the_seed_and_fold(mixed_file, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    config = _tiny_with_callback(tmp_path / "nan.yaml", "helpers_kill.NaNAtStep", step=1)  # in epoch 2
    out = tmp_path / "cv"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--train_config", config, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "2",
                 "--samples", "4", "--n_boot", "100", "--estimators", "msp,posterior_var", "--out", out], capsys)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: training stopped: seed 0, fold 1/2: non-finite"), err
    assert "train step 1" in err and "Traceback" not in err
    assert not (out / "results.json").exists()
    assert sorted(p.name for p in (out / "units").iterdir()) == ["base.json", "manifest.json", "seed0.json"]


def test_a_rerun_reads_its_units_one_with_other_settings_is_refused_and_more_seeds_extend_it(mixed_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cv"
    common = ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0,1", "--epochs", "1",
              "--n_boot", "100", "--estimators", "msp,posterior_var,latent_kl,latent_mi,probe", "--out", out]
    run_cli([*common, "--samples", "4"], capsys)
    units = sorted(p.name for p in (out / "units").iterdir())
    assert units == sorted(
        ["manifest.json", "base.json", "seed0.json", "seed1.json", "seed0-probe.json", "seed1-probe.json"]
        + [f"seed{s}-fold{f}.{ext}" for s in (0, 1) for f in (0, 1) for ext in ("json", "ckpt")]
    )
    first = {name: (out / name).read_bytes() for name in ("results.json", "scores.jsonl", "report.md")}
    real_latent = FoldLatents.latent

    def no_training(*args, **kwargs):
        raise AssertionError("a finished unit was computed again")

    monkeypatch.setattr(FoldLatents, "latent", no_training)
    run_cli([*common, "--samples", "4"], capsys)  # every unit read back: the same files, timings included
    assert {name: (out / name).read_bytes() for name in first} == first
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*common, "--samples", "8"], capsys)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "eval.samples (4 there, 8 here)" in err and "another --out" in err
    assert {name: (out / name).read_bytes() for name in first} == first
    # more seeds extend the run: seeds 0 and 1 read back, only seed 2's latents trained
    trained: list[int] = []
    monkeypatch.setattr(FoldLatents, "latent", lambda self, seed, fold, train, member=0: (
        trained.append(seed), real_latent(self, seed, fold, train, member))[1])
    extended = [*common[: common.index("--seeds") + 1], "0,1,2", *common[common.index("--seeds") + 2 :]]
    run_cli([*extended, "--samples", "4"], capsys)
    assert trained == [2, 2]
    before = [json.loads(line) for line in first["scores.jsonl"].decode().splitlines()]
    after = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in after] == [r["scores"] for r in before]  # seed 0's, read back
    assert [r["scores_by_seed"]["1"] for r in after] == [r["scores_by_seed"]["1"] for r in before]


# the clock of the runs below: every reading one tick after the last, in the modules whose
# readings become the recorded seconds, so that a duration is the same in every run and the
# byte comparison covers the timing fields too (a resumed run must take them from its units)
TICKING = textwrap.dedent(
    """
    import itertools, sys, types
    import vtrans.evaluation.crossval, vtrans.estimators.plan, vtrans.estimators.runner, vtrans.evaluation.units
    from vtrans.cli import main

    ticks = itertools.count()
    clock = types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    for module in (vtrans.evaluation.crossval, vtrans.estimators.plan, vtrans.estimators.runner, vtrans.evaluation.units):
        module.time = clock
    main(sys.argv[1:])
    """
)


def _crossval(config: Path, data: Path, out: Path, kill_in_run: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.pop("VTRANS_KILL_IN_RUN", None)
    if kill_in_run:
        env["VTRANS_KILL_IN_RUN"] = kill_in_run
    args = ["crossval", "--train_config", str(config), "--data", f"txt:{data}", "--folds", "3", "--seeds", "0,1",
            "--epochs", "2", "--samples", "4", "--passes", "2", "--n_boot", "100", "--out", str(out), "--quiet",
            "--estimators", "msp,lens_ce,mc_dropout_mi,posterior_var,latent_kl,latent_mi,probe"]
    return subprocess.Popen([sys.executable, "-c", TICKING, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_run_killed_mid_fold_resumes_and_writes_the_files_of_an_uninterrupted_run(mixed_file, tmp_path):
    """SIGKILL while seed 1's first fold trains (the 4th training run, step 2 of 4); the same command
    again finishes from the recorded units: results.json and scores.jsonl byte for byte those of a
    run that was never interrupted."""
    config = _tiny_with_callback(tmp_path / "tiny.yaml", "helpers_kill.KillInRun")
    straight = _crossval(config, mixed_file, tmp_path / "straight")
    killed = _crossval(config, mixed_file, tmp_path / "killed", kill_in_run="4:2")
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -9, f"the run was not killed (exit {killed.returncode}):\n{err[-3000:]}"
    units = tmp_path / "killed" / "units"
    assert sorted(p.name for p in units.glob("*.json")) == [
        "base.json", "manifest.json", "seed0-fold0.json", "seed0-fold1.json", "seed0-fold2.json", "seed0-probe.json",
        "seed0.json", "seed1.json",
    ]
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = _crossval(config, mixed_file, tmp_path / "killed")
    for proc in (resumed, straight):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    for name in ("results.json", "scores.jsonl", "report.md"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert len(results["fold_training"]) == 6 and results["estimators"]["latent_mi"]["n"] == 30



@pytest.mark.slow
def test_the_shared_prompt_and_scored_column_paths_score_every_item_as_the_full_computation(mixed_file, tmp_path, capsys):
    """The estimators whose computation takes a shortcut (the sampled completions: each prompt run
    once for its K samples, decoding stopped once every word is final; MC dropout: the unembedding
    at the scored columns only), and the latent's, score every item as the full computation does:
    the records of ``tests/fixtures/crossval_reference.json``, computed with this command without the shortcuts.
    The draws are the same (the same seeded streams over the same shapes), so the only differences
    are float32 reorderings between batch shapes and CPUs, ~1e-6 on scores of size ~1 (and on the
    one epoch of tiny training): 1e-4 absolute holds with margin; the sampled words compare
    exactly through their shares of K. The AUROCs agree but for pairs (wrong, correct) whose
    reference scores lie within that tolerance of each other: such a near-tie may order either
    way, and each moves the AUROC by 1/(wrong × correct)."""
    reference = json.loads((TESTS / "fixtures" / "crossval_reference.json").read_text())
    names = list(reference["rows"][0]["scores"])
    out = tmp_path / "cv"
    run_cli(["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "3", "--seeds", "0,1", "--epochs", "1",
             "--samples", "4", "--passes", "3", "--agreement_samples", "4", "--n_boot", "100",
             "--estimators", ",".join(names), "--out", out], capsys)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["idiom"] for r in rows] == [r["idiom"] for r in reference["rows"]]
    for now, then in zip(rows, reference["rows"], strict=True):
        assert (now["completion_word"], now["correct"], now["fold"]) == (then["completion_word"], then["correct"], then["fold"])
        for seed_now, seed_then in [(now["scores"], then["scores"]), *((now["scores_by_seed"][s], v) for s, v in then["scores_by_seed"].items())]:
            for name in names:
                assert seed_now[name] == pytest.approx(seed_then[name], abs=1e-4), (now["idiom"], name)
    results = json.loads((out / "results.json").read_text())
    for name, aurocs in reference["auroc"].items():
        for seed, auroc in enumerate(aurocs):
            column = [(r["scores_by_seed"][str(seed)] if str(seed) in r.get("scores_by_seed", {}) else r["scores"])[name]
                      for r in reference["rows"]]
            wrong = [s for s, r in zip(column, reference["rows"], strict=True) if not r["correct"]]
            right = [s for s, r in zip(column, reference["rows"], strict=True) if r["correct"]]
            near = sum(abs(w - c) <= 2e-4 for w in wrong for c in right)
            slack = near / (len(wrong) * len(right)) + 1e-3
            assert results["estimators"][name]["seeds"]["auroc"][seed] == pytest.approx(auroc, abs=slack), (name, seed, near)


@pytest.mark.slow
def test_refit_spread_trains_each_latent_without_a_third_and_refits_its_spread_there(mixed_file, tmp_path, capsys, monkeypatch):
    """With --refit_spread fold f's latent trains on its outside idioms but a held-out third, and its
    prior's spread is refit on exactly that third: never on a scored idiom, never on one it trained on."""
    from vtrans.latent import refit

    trained_on: list[set[str]] = []
    refit_on: list[set[str]] = []
    real_from_items = IdiomDataModule.from_items.__func__
    real_fit = refit.fit

    def recording(cls, train, *args, **kwargs):
        trained_on.append({idiom_key(it.idiom) for it in train})
        return real_from_items(cls, train, *args, **kwargs)

    def fit_recording(module, prompts, targets, *args, **kwargs):
        refit_on.append({idiom_key(p.removeprefix(DEFAULT_TEMPLATE.split("{prefix}")[0]) + " " + t) for p, t in zip(prompts, targets, strict=True)})
        return real_fit(module, prompts, targets, *args, **kwargs)

    monkeypatch.setattr(IdiomDataModule, "from_items", classmethod(recording))
    monkeypatch.setattr(refit, "fit", fit_recording)
    out = tmp_path / "cv"
    run_cli(["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "3", "--seeds", "0", "--epochs", "1",
             "--samples", "4", "--n_boot", "100", "--refit_spread", "--out", out,
             "--estimators", "msp,refit_prior_var,refit_var,refit_mi,refit_nll,latent_nll"], capsys)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert len(trained_on) == len(refit_on) == 3
    for fold, (train, held) in enumerate(zip(trained_on, refit_on, strict=True)):
        scored = {idiom_key(r["idiom"]) for r in rows if r["fold"] == fold}
        outside = {idiom_key(r["idiom"]) for r in rows} - scored
        assert not train & held and not held & scored and train | held == outside
        assert len(held) in {len(outside) // 3, len(outside) // 3 + 1}
    for name in ("refit_prior_var", "refit_var", "refit_mi", "refit_nll"):
        assert all(math.isfinite(r["scores"][name]) for r in rows), name
    assert all(e["refit_kl_after"] <= e["refit_kl_before"] + 1e-6 for e in results["fold_training"])


def test_without_refit_spread_the_refit_estimators_are_dropped_saying_why_and_the_run_goes_on(mixed_file, tmp_path, capsys):
    """A run that asks for every estimator (no --estimators) asks for the refit ones too: without
    --refit_spread there is no held-out third to refit on, so they are left out with the reason,
    before any latent trains, instead of stopping the run at its first fold."""
    out = tmp_path / "cv"
    run_cli(["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "1",
             "--samples", "4", "--n_boot", "100", "--out", out,
             "--estimators", "msp,latent_nll,refit_prior_var,refit_var"], capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["estimators"]) == {"msp", "latent_nll"}
    for name in ("refit_prior_var", "refit_var"):
        assert "--refit_spread" in results["dropped"][name]
    assert "--refit_spread" in (out / "report.md").read_text()


def test_a_family_with_a_posterior_of_its_own_runs_in_crossval_with_no_edit_to_it(mixed_file, tmp_path, capsys, monkeypatch):
    """A family registered at run time, reading a posterior it declares: the run fits that posterior
    once per fold's latent, on the fold's training prompts, hands it to the family on the run's
    context, charges its fit to the family and logs what the posterior describes of itself."""
    from vtrans.estimators.base import Family, Posterior

    fitted_on: list[int] = []

    def fit(latent, data):
        fitted_on.append(len(data.train_prompts))
        assert not data.held_prompts  # not held_out: no idioms set aside for it
        return float(len(data.train_prompts))

    posterior = Posterior("count", "a count of the training prompts", fit, describe=lambda n: {"count_of_prompts": n})
    family = Family(
        "shifted",
        {"msp_shifted": "msp plus the count of the latent's training prompts"},
        lambda forward, context: {"msp_shifted": 1 - forward.first_slot(forward.logits).softmax(-1).max(-1).values
                                  + context.posteriors["count"]},
        needs=frozenset({"latent"}),
        posterior=posterior,
    )
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, family))
    out = tmp_path / "cv"
    run_cli(["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "1",
             "--samples", "4", "--n_boot", "100", "--estimators", "msp,msp_shifted", "--out", out], capsys)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert fitted_on == [e["n_train"] for e in results["fold_training"]] and len(fitted_on) == 2
    assert [e["count_of_prompts"] for e in results["fold_training"]] == fitted_on
    n_train = {e["fold"]: e["n_train"] for e in results["fold_training"]}
    for r in rows:  # msp is 1 − p(ŷ) of the same forward: the shift is the fold's count, nothing else
        assert r["scores"]["msp_shifted"] == pytest.approx(r["scores"]["msp"] + n_train[r["fold"]], abs=1e-5)
    assert results["seconds"]["shifted_fit"] > 0


@pytest.mark.slow
def test_the_state_probes_are_cross_fitted_on_states_that_are_never_written(mixed_file, tmp_path, capsys, monkeypatch):
    """``state_probe`` and ``state_probe_latent`` are fitted on the other folds' rows; ``se_probe``
    on their sampled words' entropy; the residual states live in memory only."""
    from vtrans.estimators import se_probe

    probe_rows: list[int] = []
    real_fit = probe.fit

    def fit_recording(x, errors, names, *args, **kwargs):
        probe_rows.append(x.shape[0])
        return real_fit(x, errors, names, *args, **kwargs)

    ridge_rows: list[int] = []
    real_choose = se_probe.choose

    def choose_recording(states, target):
        ridge_rows.append(states.shape[0])
        return real_choose(states, target)

    monkeypatch.setattr(probe, "fit", fit_recording)
    monkeypatch.setattr(se_probe, "choose", choose_recording)
    out = tmp_path / "cv-states"
    names = ["msp", "state_probe", "state_probe_latent", "se_probe"]
    run_cli(
        ["--train_config", TINY, "--data", f"txt:{mixed_file}", "--folds", "2", "--seeds", "0", "--epochs", "1",
         "--samples", "4", "--n_boot", "100", "--estimators", ",".join(names), "--out", out],
        capsys,
    )
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    outside = sorted(sum(r["fold"] != f for r in rows) for f in range(2))
    # each fold's se_probe chooses its setting on the other fold's rows only
    assert sorted(ridge_rows) == outside
    # the final fit of each state probe is on the other fold's rows (the inner folds fit on fewer)
    assert max(probe_rows) == max(outside) and all(n <= max(outside) for n in probe_rows)
    for name in names:
        assert results["estimators"][name]["n"] == 30
        assert all(math.isfinite(r["scores"][name]) for r in rows)
    assert "se_probe" not in results["dropped"] and "state_probe" not in results["dropped"]
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    assert "residual_states" not in written
    assert all("sample_word_entropy" not in r["scores"] for r in rows)  # a target, not a score asked for
