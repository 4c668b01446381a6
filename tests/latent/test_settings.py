"""Every setting a user can get wrong through ``train.py`` ends in the package's own error.

A bad value of the DataModule, the backbone or the trainer raises a ``UserError`` that says what
is allowed; ``train.py`` turns it into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vtrans.backbone.loading import Backbone
from vtrans.errors import BackboneError, ConfigError, UserError
from vtrans.latent.datamodule import IdiomDataModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_a_batch_size_of_zero_is_one_line_and_exit_code_2(run_train, tmp_path) -> None:
    proc = run_train("fit", "--config", CONFIGS / "tiny.yaml", "--data.batch_size", "0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: batch_size must be a whole number >= 1, got 0"
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


# --------------------------------------------------------------------------- the DataModule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"batch_size must be a whole number >= 1, got 0"),
        ({"batch_size": -3}, r"batch_size must be a whole number >= 1, got -3"),
        ({"batch_size": 2.5}, r"batch_size must be a whole number >= 1, got 2.5"),
        ({"batch_size": True}, r"batch_size must be a whole number >= 1, got True"),
        ({"seed": "0"}, r"seed must be a whole number, got '0'"),
        ({"num_workers": -1}, r"num_workers must be a whole number >= 0 \(0: load in the main process\), got -1"),
        ({"max_items": 0}, r"max_items must be a whole number >= 1, or null to keep every item, got 0"),
        ({"length_bucketed": "yes"}, r"length_bucketed must be true or false, got 'yes'"),
        ({"val_fraction": "0.1"}, r"val_fraction must be a number in \[0, 1\), got '0.1'"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 is out of range; use a value in \[0, 1\)"),
        ({"test_fraction": -0.1}, r"test_fraction=-0.1 is out of range; use a value in \[0, 1\)"),
        ({"test_fraction": float("nan")}, r"test_fraction=nan is out of range"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"leaves nothing to train on; keep the sum below 1"),
        ({"template": "{x}"}, r"write it with the field \{prefix\}"),
        ({"template": None}, r"template must be a string with the field \{prefix\}, got None"),
        ({"data": "json:x"}, r"unknown data spec 'json:x'; use builtin, builtin:SPLIT or KIND:PATH"),
        ({"data": "txt:"}, r"names no file; write txt:PATH"),
        ({"data": "builtin:dev"}, r"unknown split 'dev'"),
    ],
)
def test_each_bad_datamodule_setting_is_a_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IdiomDataModule(**kwargs)


def test_the_edges_of_the_datamodule_settings_are_allowed() -> None:
    IdiomDataModule(batch_size=1, seed=-5, val_fraction=0, test_fraction=0, num_workers=0, max_items=1)
    IdiomDataModule(val_fraction=0.5, test_fraction=0.49, max_items=None, length_bucketed=True)


# --------------------------------------------------------------------------- the backbone


def test_an_unknown_attention_implementation_says_which_exist() -> None:
    with pytest.raises(BackboneError, match=r"attn_implementation must be one of eager, sdpa, flash_attention_2, got 'fast'"):
        Backbone("tiny-gpt2", attn_implementation="fast")


def test_an_attention_implementation_whose_package_is_missing_is_a_backbone_error(monkeypatch) -> None:
    from vtrans.backbone import loading

    def missing(*args, **kwargs):
        raise ImportError("the package for FlashAttention2 doesn't seem to be installed.\nmore detail")

    monkeypatch.setattr(loading, "load_tiny", missing)
    with pytest.raises(BackboneError) as err:
        Backbone("tiny-gpt2", attn_implementation="flash_attention_2")
    assert str(err.value) == (
        "cannot load 'tiny-gpt2' (attn_implementation='flash_attention_2'): "
        "the package for FlashAttention2 doesn't seem to be installed."
    )


@pytest.mark.parametrize("name", ["", None])
def test_a_backbone_needs_a_name(name) -> None:
    with pytest.raises(BackboneError, match="name must name a model"):
        Backbone(name)


# --------------------------------------------------------------------------- through train.py, in process


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data.num_workers", "-1"], "error: num_workers must be a whole number >= 0"),
        (["--data.max_items", "0"], "error: max_items must be a whole number >= 1"),
        (["--data.val_fraction", "1.5"], "error: val_fraction=1.5 is out of range"),
        (["--data.data", "csv:x"], "error: unknown data spec 'csv:x'"),
        (["--model.backbone.init_args.attn_implementation", "fast"], "error: attn_implementation must be one of"),
        (["--model.d_z", "0"], "error: d_z must be >= 1, got 0"),
        (["--trainer.max_epochs", "-5"], "error: trainer: `max_epochs` must be a non-negative integer or -1"),
        (["--trainer.devices", "0"], "error: trainer: `Trainer(devices='0')` value is not a valid input"),
    ],
)
def test_train_main_turns_each_bad_setting_into_exit_code_2(flags, message, tmp_path, monkeypatch, capsys) -> None:
    from vtrans.cli import train_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        train_main(["--config", str(CONFIGS / "tiny.yaml"), "--trainer.logger", "false", *flags], run=False)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(message), err
    assert "Traceback" not in err


def test_every_user_error_is_a_value_or_runtime_error_jsonargparse_passes_on() -> None:
    """jsonargparse wraps ImportError, AttributeError and AssertionError raised by a nested class
    (the backbone) into a plain ValueError, which would lose the UserError: none of ours is one."""
    for error in (ConfigError, BackboneError):
        assert issubclass(error, UserError)
        assert not issubclass(error, ImportError | AttributeError | AssertionError)
