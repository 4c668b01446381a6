"""No contamination: a checkpoint knows its training idioms, and evaluation leaves them out.

The tiny fit (``configs/tiny.yaml``: builtin data, split seed 0, the first 64 train items)
records the hashes of exactly the idioms it trained on; ``vtrans evaluate`` on a file mixing
those with unseen idioms leaves the trained ones out and says how many; ``--keep_seen`` keeps
them; a checkpoint trained with another split seed is evaluated on *its* test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtrans.cli import main
from vtrans.config import EvalConfig
from vtrans.data import idiom_hash, load_split
from vtrans.errors import ConfigError
from vtrans.evaluation.fitted import fit_items
from vtrans.evaluation.items import split_settings
from vtrans.latent import checkpoint
from vtrans.latent.datamodule import IdiomDataModule

TRAIN_ITEMS = 64  # configs/tiny.yaml: data.max_items
ESTIMATORS = "msp,posterior_var"


def run_cli(args: list, capsys, quiet: bool = True) -> tuple[str, str]:
    """``vtrans evaluate ARGS``; ``quiet=False`` for a test that reads what it says on stderr."""
    main(["evaluate", *map(str, args), *(["--quiet"] if quiet else []), "--n_boot", "100", "--estimators", ESTIMATORS])
    captured = capsys.readouterr()
    return captured.out, captured.err


def read_outputs(out: Path) -> tuple[dict, list[dict], str]:
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return results, rows, (out / "report.md").read_text()


@pytest.fixture(scope="module")
def trained() -> list[str]:
    """The idioms the tiny fit trains on: the first 64 of the builtin train split (seed 0)."""
    return [it.idiom for it in load_split("builtin", "train")[:TRAIN_ITEMS]]


@pytest.fixture(scope="module")
def unseen() -> list[str]:
    return [it.idiom for it in load_split("builtin", "test")]


def write_ckpt(source: Path, dest: Path, seed: int | None = None, drop_record: bool = False) -> Path:
    """A copy of a checkpoint as if trained with split seed ``seed`` (its record redone to match)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    if seed is not None:
        ckpt["datamodule_hyper_parameters"]["seed"] = seed
        train = load_split("builtin", "train", seed=seed)[:TRAIN_ITEMS]
        ckpt[IdiomDataModule.__qualname__] = {"train_idiom_hashes": sorted(idiom_hash(it.idiom) for it in train)}
    if drop_record:
        del ckpt[IdiomDataModule.__qualname__]
    torch.save(ckpt, dest)
    return dest


# --------------------------------------------------------------------------- the record


def test_idiom_hash_matches_normalised_forms_only():
    h = idiom_hash("let the cat out of the bag")
    assert len(h) == 16 and int(h, 16) >= 0
    assert idiom_hash("  Let the CAT out of the bag. ") == idiom_hash("let  the cat out of the bag") == h
    assert idiom_hash("let the cat out of the box") != h


def test_checkpoint_records_exactly_its_training_idioms(tiny_ckpt, trained):
    raw = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)[IdiomDataModule.__qualname__]
    assert raw["train_idiom_hashes"] == sorted(idiom_hash(i) for i in trained)  # sorted, hashes only
    assert checkpoint.trained_idiom_hashes(checkpoint.read(tiny_ckpt)) == {idiom_hash(i) for i in trained}
    later = load_split("builtin", "train")[TRAIN_ITEMS:]  # in the train split but cut by max_items: not trained on
    assert later and not {idiom_hash(it.idiom) for it in later} & checkpoint.trained_idiom_hashes(checkpoint.read(tiny_ckpt))
    assert checkpoint.split_settings(checkpoint.read(tiny_ckpt)) == {"data": "builtin", "seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}


def test_datamodule_records_a_txt_file_and_keeps_a_resumed_runs(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a bird in the hand\nbreak the ice\nspill the beans\nhit the sack\nbite the bullet\n")
    dm = IdiomDataModule(data=f"txt:{path}", val_fraction=0.2, test_fraction=0.2)
    assert dm.state_dict() == {}  # nothing loaded, nothing trained on
    dm.setup("fit")
    hashes = [idiom_hash(it.idiom) for it in dm.items["train"]]
    assert dm.state_dict() == {"train_idiom_hashes": sorted(hashes)}
    dm.load_state_dict({"train_idiom_hashes": ["0123456789abcdef"]})
    assert dm.state_dict() == {"train_idiom_hashes": sorted([*hashes, "0123456789abcdef"])}


# --------------------------------------------------------------------------- evaluate leaves them out


@pytest.mark.slow
def test_evaluate_leaves_out_trained_idioms_and_says_how_many(tiny_ckpt, trained, unseen, tmp_path, capsys):
    data = tmp_path / "mixed.txt"
    seen = trained[:5]
    data.write_text("\n".join([*seen, *unseen[:7]]).upper() + "\n")  # written otherwise: still matched
    out = tmp_path / "run"
    _, stderr = run_cli(["--ckpt", tiny_ckpt, "--data", f"txt:{data}", "--split", "all", "--out", out], capsys, quiet=False)
    results, rows, report = read_outputs(out)
    assert {r["idiom"].lower() for r in rows} == set(unseen[:7])
    assert results["n"] == 7
    assert (results["seen"], results["seen_left_out"], results["seen_of"], results["keep_seen"]) == (5, 5, 12, False)
    assert "left out 5 of 12 idioms the latent was trained on (--keep_seen keeps them); n = 7 to evaluate" in stderr
    assert "5 items whose idiom the latent was trained on were left out" in report

    out = tmp_path / "kept"
    _, stderr = run_cli(
        ["--ckpt", tiny_ckpt, "--data", f"txt:{data}", "--split", "all", "--keep_seen", "--out", out], capsys, quiet=False
    )
    results, rows, report = read_outputs(out)
    assert len(rows) == results["n"] == 12
    assert (results["seen"], results["seen_left_out"], results["keep_seen"]) == (5, 0, True)
    assert "kept 5 idioms the latent was trained on" in stderr
    assert "are included (`--keep_seen`)" in report


@pytest.mark.slow
def test_evaluate_on_trained_idioms_only_is_a_user_error(tiny_ckpt, trained, tmp_path, capsys):
    data = tmp_path / "trained.txt"
    data.write_text("\n".join(trained[:6]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--ckpt", tiny_ckpt, "--data", f"txt:{data}", "--split", "all", "--out", tmp_path / "run"], capsys)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: all 6 idioms of txt:") and "keep_seen" in err.replace("-", "_")  # the flag, however the message spells it
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the checkpoint's split


@pytest.mark.slow
def test_builtin_test_is_the_test_split_the_latent_was_kept_from(tiny_ckpt, tmp_path, capsys):
    """A latent trained with split seed 1: ``builtin:test`` is seed 1's test split, not seed 0's
    (which holds some of seed 1's training idioms)."""
    ckpt = write_ckpt(tiny_ckpt, tmp_path / "seed1.ckpt", seed=1)
    train1 = {it.idiom for it in load_split("builtin", "train", seed=1)[:TRAIN_ITEMS]}
    assert train1 & {it.idiom for it in load_split("builtin", "test", seed=0)}  # the leak the fix prevents
    out = tmp_path / "run"
    run_cli(["--ckpt", ckpt, "--data", "builtin:test", "--out", out], capsys)
    results, rows, _ = read_outputs(out)
    assert {r["idiom"] for r in rows} == {it.idiom for it in load_split("builtin", "test", seed=1)}
    assert results["seen_left_out"] == 0
    assert results["split"] == {"seed": 1, "val_fraction": 0.15, "test_fraction": 0.15}


@pytest.mark.slow
def test_an_older_checkpoint_is_split_its_way_and_warns_it_cannot_check(tiny_ckpt, tmp_path, capsys):
    ckpt = write_ckpt(tiny_ckpt, tmp_path / "old.ckpt", seed=1, drop_record=True)
    assert checkpoint.trained_idiom_hashes(checkpoint.read(ckpt)) is None
    out = tmp_path / "run"
    _, stderr = run_cli(["--ckpt", ckpt, "--data", "builtin:test", "--max_items", "8", "--out", out], capsys, quiet=False)
    results, rows, report = read_outputs(out)
    assert {r["idiom"] for r in rows} <= {it.idiom for it in load_split("builtin", "test", seed=1)}
    assert results["seen"] is None and results["seen_left_out"] is None
    assert "warning: the checkpoint does not record its training idioms" in stderr
    assert "does not record its training idioms" in report


def test_split_settings_come_from_the_checkpoint_and_conflicts_are_refused():
    recorded = {"data": "builtin", "seed": 1, "val_fraction": 0.1, "test_fraction": 0.2}
    assert split_settings(EvalConfig(), recorded) == {"seed": 1, "val_fraction": 0.1, "test_fraction": 0.2}
    assert split_settings(EvalConfig(split_seed=1, test_fraction=0.2), recorded)["seed"] == 1
    assert split_settings(EvalConfig(split_seed=3)) == {"seed": 3, "val_fraction": 0.15, "test_fraction": 0.15}
    with pytest.raises(ConfigError, match=r"split_seed=0 differs from the checkpoint's seed=1"):
        split_settings(EvalConfig(split_seed=0), recorded)
    with pytest.raises(ConfigError, match=r"test_fraction=0.15 differs from the checkpoint's test_fraction=0.2"):
        split_settings(EvalConfig(test_fraction=0.15), recorded)


def test_the_probe_fits_on_the_checkpoints_val_split_of_its_own_settings_less_its_recorded_idioms():
    recorded = {"data": "builtin", "seed": 1, "val_fraction": 0.15, "test_fraction": 0.15}
    evaluated = load_split("builtin", "test", seed=1)
    got, _ = fit_items(evaluated, recorded)
    assert got == load_split("builtin", "val", seed=1)
    # a latent trained on chosen items records a spec that does not describe them: its hashes rule
    trained = {idiom_hash(it.idiom) for it in got[:10]}
    fewer, _ = fit_items(evaluated, recorded, trained)
    assert fewer == got[10:]


def test_a_conflicting_split_seed_is_one_line_and_exit_2(tiny_ckpt, tmp_path, capsys):
    ckpt = write_ckpt(tiny_ckpt, tmp_path / "seed1.ckpt", seed=1)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--ckpt", ckpt, "--data", "builtin:test", "--split_seed", "0", "--out", tmp_path / "run"], capsys)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: split_seed=0 differs from the checkpoint's seed=1") and "\n" not in err
