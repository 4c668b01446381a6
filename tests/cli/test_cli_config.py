"""The typed command line: ``--config``/``--print_config``, defaults from the dataclasses, bad values.

``vtrans evaluate|crossval|score`` take their settings from ``EstimatorConfig``, ``EvalConfig``
and ``CrossvalConfig``. These tests parse only (the command functions are replaced by
recorders), except the last, which runs a small evaluation from a config file.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import vtrans.cli.entry as cli
from vtrans.cli import main
from vtrans.cli.parsing import field_default
from vtrans.config import EstimatorConfig
from vtrans.estimators.registry import NAMES, chosen
from vtrans.evaluation.crossval import CrossvalConfig
from vtrans.evaluation.evaluate import EvalConfig

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

# the fewest options each subcommand needs
REQUIRED = {
    "evaluate": ["--out", "runs/x"],
    "crossval": ["--train_config", str(TINY), "--out", "runs/x"],
    "score": ["--ckpt", "no.ckpt"],
}


def printed(capsys, *args: str) -> tuple[str, dict]:
    """``vtrans ARGS --print_config``: the YAML it prints, as text and parsed."""
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args), "--print_config"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    return text, yaml.safe_load(text)


def failed(capsys, *args: str) -> str:
    """``vtrans ARGS`` that must fail as a user error: exit code 2 and the stderr it wrote."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, args)))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert captured.out == ""
    return captured.err


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, object, dict]]:
    """Replace the three command functions by recorders of (command, settings, own options)."""
    seen: list[tuple[str, object, dict]] = []

    def recorder(name: str):
        command = getattr(cli, f"{name}_command")

        @functools.wraps(command)  # the parser reads the command's signature: keep it
        def record(settings, **own):
            seen.append((name, settings, own))

        return record

    for name in ("evaluate", "crossval", "score"):
        monkeypatch.setattr(cli, f"{name}_command", recorder(name))
    return seen


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("evaluate", ["--n_boot", "200", "--estimators", "msp,entropy", "--keep_seen", "--template", "Q: {prefix}"]),
        ("crossval", ["--seeds", "0,1", "--folds", "3", "--samples", "8", "--self_targets"]),
        ("score", ["--batch_size", "8", "--estimators", "[msp, lens_ce]", "--quiet", "a prompt", "another prompt"]),
    ],
)
def test_print_config_round_trips(command, extra, tmp_path, capsys):
    text, values = printed(capsys, command, *REQUIRED[command], *extra)
    path = tmp_path / f"{command}.yaml"
    path.write_text(text)
    again, loaded = printed(capsys, command, "--config", path)
    assert again == text and loaded == values
    if command == "score":
        assert values["prompts"] == ["a prompt", "another prompt"] and values["quiet"] is True


def test_a_later_option_overrides_the_config_file_and_an_earlier_one_does_not(tmp_path, capsys):
    path = tmp_path / "eval.yaml"
    path.write_text("out: runs/from-file\nn_boot: 200\nbatch_size: 4\n")
    _, later = printed(capsys, "evaluate", "--config", path, "--n_boot", "300")
    assert (later["n_boot"], later["batch_size"], later["out"]) == (300, 4, "runs/from-file")
    _, earlier = printed(capsys, "evaluate", "--n_boot", "300", "--config", path)
    assert earlier["n_boot"] == 200


def test_the_example_config_prints_in_full(capsys):  # the one file of tests/latent/test_training.py's COMMAND_CONFIGS
    _, values = printed(capsys, "evaluate", "--config", REPO / "configs" / "eval.yaml")
    assert values["ckpt"] == "checkpoints/smollm2/last.ckpt" and values["data"] == "builtin:test"
    assert {f.name for f in fields(EvalConfig)} <= set(values)  # every setting, defaults included
    EvalConfig(**{f.name: values[f.name] for f in fields(EvalConfig) if f.name != "template"})


# --------------------------------------------------------------------------- one default, written once


def test_the_defaults_the_parsers_show_are_the_dataclass_defaults(capsys):
    _, evaluate = printed(capsys, "evaluate", *REQUIRED["evaluate"])
    for f in fields(EvalConfig):
        if f.name != "template":  # --template null: the checkpoint's, else EvalConfig's
            assert evaluate[f.name] == field_default(EvalConfig, f.name), f.name
    assert evaluate["template"] is None
    assert EvalConfig().estimators is None and chosen(None) == list(NAMES)  # null: every estimator

    _, score = printed(capsys, "score", *REQUIRED["score"])
    for f in fields(EstimatorConfig):
        assert score[f.name] == getattr(EstimatorConfig(), f.name), f.name

    _, crossval = printed(capsys, "crossval", *REQUIRED["crossval"])
    default = CrossvalConfig(config=str(TINY))
    for f in fields(CrossvalConfig):
        if f.name not in ("config", "eval"):  # config is --train_config; eval's fields are top-level
            assert crossval[f.name] == getattr(default, f.name), f.name
    not_crossval = {"data", "split", "template", "seed", "keep_seen", "split_seed", "val_fraction", "test_fraction"}
    for f in fields(EvalConfig):
        if f.name not in not_crossval:  # the cross-fitting's own, or each training seed
            assert crossval[f.name] == field_default(EvalConfig, f.name), f.name
        elif f.name not in {"data", "template"}:
            assert f.name not in crossval, f.name


def test_help_lists_every_option_with_its_type_default_and_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(EvalConfig):
        assert f"--{f.name}" in text, f.name
    assert "prompts per forward. (type: int, default: 32)" in text  # EstimatorConfig's docstring
    assert "--quiet, --no_quiet" in text and "--config CONFIG" in text and "--print_config" in text


# --------------------------------------------------------------------------- values reach the dataclasses


def test_lists_take_a_comma_separated_string_or_a_yaml_list(calls, tmp_path):
    main(["evaluate", "--out", "x", "--estimators", "msp, entropy", "--keep_seen", "--no_quiet"])
    main(["evaluate", "--out", "x", "--estimators", "[msp, entropy]"])
    (tmp_path / "e.yaml").write_text("out: x\nestimators: [msp, entropy]\nbatch_size: 4\n")
    main(["evaluate", "--config", str(tmp_path / "e.yaml")])
    (_, first, own), (_, second, _), (_, third, _) = calls
    assert first.estimators == second.estimators == third.estimators == ["msp", "entropy"]
    assert isinstance(first, EvalConfig) and first.keep_seen and not own["quiet"]
    assert (third.batch_size, own["out"], own["template"], own["model"]) == (4, "x", None, "smollm2")

    for seeds, expected in [("0,1,2", [0, 1, 2]), ("7", [7]), ("[3, 4]", [3, 4])]:
        main(["crossval", *REQUIRED["crossval"], "--seeds", seeds, "--samples", "8", "--estimators", "msp"])
        _, settings, _ = calls[-1]
        assert isinstance(settings, CrossvalConfig) and settings.seeds == expected
        assert settings.config == str(TINY) and settings.eval.samples == 8 and settings.eval.estimators == ["msp"]


def test_score_flags_leave_the_prompts_alone_and_settings_are_one_config(calls):
    main(["score", "--ckpt", "c.ckpt", "--samples", "4", "--estimators", "msp,lens_ce", "--quiet", "a prompt", "b"])
    (command, settings, own), = calls
    assert command == "score" and own["prompts"] == ["a prompt", "b"] and own["quiet"] is True
    assert settings == EstimatorConfig(samples=4)
    assert own["estimators"] == "msp,lens_ce"  # split by the command: None means the checkpoint's default


# --------------------------------------------------------------------------- bad settings: one line, exit 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--out", "x", "--batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["evaluate", "--out", "x", "--samples", "1"], "samples must be >= 2, got 1"),
        (["evaluate", "--out", "x", "--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
        (["crossval", *REQUIRED["crossval"], "--batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["crossval", *REQUIRED["crossval"], "--seeds", "0,a"], "seeds must be comma-separated int values"),
        # checked before the checkpoint is looked for
        (["score", "--ckpt", "/no/such.ckpt", "--samples", "1", "x"], "samples must be >= 2, got 1"),
        (["evaluate", "--out", "x", "--estimators", "msp,nope"], "unknown estimator(s) nope"),
        (["crossval", *REQUIRED["crossval"], "--estimators", "[nope]"], "unknown estimator(s) nope"),
    ],
)
def test_a_value_out_of_range_is_the_packages_one_line(args, message, capsys):
    err = failed(capsys, *args)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_value_out_of_range_in_a_config_file_is_the_same_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("out: x\nbatch_size: 0\n")
    assert failed(capsys, "evaluate", "--config", path) == "error: batch_size must be >= 1, got 0\n"


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["evaluate", "--out", "x", "--batch_size", "abc"], "batch_size"),
        (["evaluate", "--out", "x", "--z_draws", "halton"], "z_draws"),
        (["evaluate", "--out", "x", "--bogus", "1"], "--bogus"),
        (["evaluate", "--out", "x", "--batch-size", "8"], "--batch-size"),  # the old spelling
        (["score", "--ckpt", "c.ckpt", "--long_prompts", "drop", "x"], "long_prompts"),
        (["evaluate"], "out"),
        (["nonsense"], "nonsense"),
    ],
)
def test_a_wrong_type_or_unknown_option_is_a_short_message_and_exit_2(args, mentions, capsys):
    err = failed(capsys, *args)
    assert err.startswith("error: ") and mentions in err and "--help" in err, err
    assert "usage:" not in err and "Traceback" not in err and len(err.splitlines()) <= 8, err


# --------------------------------------------------------------------------- a run from a config file


def test_evaluate_runs_from_a_config_file_with_an_override(tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "eval.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": "tiny-gpt2", "data": "builtin", "max_items": 4, "n_boot": 100, "batch_size": 2,
             "estimators": ["msp", "entropy"], "out": str(tmp_path / "elsewhere"), "quiet": True}
        )
    )
    main(["evaluate", "--config", str(path), "--out", str(out), "--estimators", "msp,lens_ce"])
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 4 and set(results["estimators"]) == {"msp", "lens_ce"}
    assert results["config"]["batch_size"] == 2 and results["config"]["estimators"] == ["msp", "lens_ce"]
    assert not (tmp_path / "elsewhere").exists()
    assert "msp" in capsys.readouterr().out


def _in_fresh_python(code: str) -> str:
    """What ``code`` prints when run in a new interpreter (nothing imported before it)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_of_every_subcommand_imports_no_torch() -> None:
    """``--help`` answers at once: building every parser and its help imports neither torch nor
    an estimator (torch alone takes over a second to import)."""
    code = (
        "import sys\n"
        "from vtrans.cli.entry import SUBCOMMANDS, build_parser\n"
        "for name in [None, *SUBCOMMANDS]:\n"
        "    build_parser(name).format_help()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'lightning', 'vtrans.estimators') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    assert _in_fresh_python(code).strip() == ""


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["evaluate", "--ckpt", "x"], "error: --out is required (see: vtrans evaluate --help)"),
        (["score"], "error: --ckpt is required (see: vtrans score --help)"),
        (["evaluate", "--out", "x", "--split", "bogus"], "error: --split: expected one of train, val, test, all, got 'bogus'"),
        (["score", "--ckpt", "x", "--batch_size", "abc", "y"], "error: --batch_size: expected int, got 'abc'"),
        (["evaluate", "--out", "x", "--max_items", "1.5"], "error: --max_items: expected int or null, got '1.5'"),
    ],
)
def test_parser_errors_are_one_line_naming_the_option_as_typed(capsys, argv, expected) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_estimators_lists_every_name_with_its_help(capsys) -> None:
    from vtrans.estimators.registry import NAMES, SCORE_DEFAULTS

    main(["estimators"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == list(NAMES)
    assert {row.split()[0] for row in rows if "  default  " in row} == set(SCORE_DEFAULTS)


def test_vtrans_fit_trains_as_train_py_does(tmp_path, monkeypatch) -> None:
    """An installed package trains without train.py: ``vtrans fit`` is LightningCLI's ``fit``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["vtrans"])  # the arguments come from here, not from pytest's command line
    main(["fit", "--config", str(TINY), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "false"])
    from vtrans.latent import checkpoint

    ckpt = checkpoint.read(tmp_path / "checkpoints" / "tiny" / "last.ckpt")
    assert ckpt["epoch"] == 0 and ckpt["vtrans"]["backbone"]["name"] == "tiny-gpt2"


def test_the_package_root_exports_the_api_without_importing_torch() -> None:
    code = (
        "import sys, vtrans\n"
        "light = 'torch' not in sys.modules\n"
        "from vtrans import Backbone, CrossvalConfig, EstimatorConfig, EvalConfig, Scorer\n"
        "from vtrans.scoring.scorer import Scorer as S\n"
        "print(light, Scorer is S, vtrans.__version__)\n"
    )
    light, same, version = _in_fresh_python(code).split()
    assert light == "True" and same == "True" and version[0].isdigit()
