"""Fitted estimators (``vtrans.evaluation.fitted``): the probe is fitted on items disjoint from the
evaluated ones and out-of-sample for the latent, on any data file."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import CONFIGS

from vtrans.backbone.generate import complete
from vtrans.cli import main
from vtrans.data import DEFAULT_TEMPLATE, load_split, normalize_word, render_prompt, split_idiom, split_items
from vtrans.data.items import idiom_key
from vtrans.evaluation.fitted import Unfittable, fit_items

# --------------------------------------------------------------------------- 5. the probe on any file

BUILTIN_SPLIT = {"data": "builtin", "seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}


def _keys(items) -> set[str]:
    return {idiom_key(it.idiom) for it in items}


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
