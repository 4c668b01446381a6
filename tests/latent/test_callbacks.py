"""``vtrans.latent.callbacks.Summary``: the model summary at the start of training says what trains."""

from __future__ import annotations

import sys

import pytest
from conftest import CONFIGS
from lightning.pytorch.callbacks import ModelSummary

from vtrans.cli import train_main
from vtrans.latent.callbacks import Summary, summary_table
from vtrans.latent.module import LatentLM


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv also holds arguments (pytest's own)."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


def rows(table: str) -> dict[str, list[str]]:
    """The table's rows by module name: [type, params, trainable, mode]."""
    cells = [[c.strip() for c in line.split("|")] for line in table.splitlines() if line.count("|") == 5]
    return {row[1]: row[2:] for row in cells[1:]}


def test_the_backbone_reads_as_frozen_and_the_latent_as_training(tiny_gpt2):
    module = LatentLM(tiny_gpt2, d_z=8, hidden=32)
    table = summary_table(module)
    by_name = rows(table)
    # the latent model holds the frozen backbone and the latent: both shown at the first level
    assert list(by_name) == ["model", "model.backbone", "model.latent", "loss_fn", "stats", "means"]
    kind, params, trainable, mode = by_name["model.backbone"]
    assert (kind, trainable, mode) == ("Backbone", "0", "eval") and params.endswith("M")
    latent = sum(p.numel() for p in module.model.latent.parameters())
    assert by_name["model.latent"][1] == by_name["model.latent"][2] and by_name["model.latent"][3] == "train"
    assert by_name["model"][0] == "LatentModel" and by_name["model"][2] == by_name["model.latent"][2]
    lines = table.splitlines()
    assert any(line.split()[0] == f"{latent / 1000:.1f}" and line.endswith("Trainable params") for line in lines)
    assert "FLOPs" not in table and "Flops" not in table


def test_max_depth_shows_the_nested_modules(tiny_gpt2):
    module = LatentLM(tiny_gpt2, d_z=8, hidden=32)
    assert "model.latent.proj" in rows(summary_table(module, max_depth=2))
    assert "model.latent.proj.weight" not in rows(summary_table(module, max_depth=2))
    assert "model.backbone.model.transformer.h.0.attn" in rows(summary_table(module, max_depth=-1))


@pytest.mark.parametrize(("flag", "summaries"), [([], [Summary]), (["--trainer.enable_model_summary", "false"], [])])
def test_train_py_summarises_with_summary_unless_told_not_to(tmp_path, monkeypatch, flag, summaries):
    monkeypatch.chdir(tmp_path)
    cli = train_main(["--config", str(CONFIGS / "tiny.yaml"), *flag], run=False)
    assert [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, ModelSummary)] == summaries


def test_a_configured_summary_keeps_its_depth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    depth = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelSummary", "--trainer.callbacks.max_depth=2"]
    cli = train_main(["--config", str(CONFIGS / "tiny.yaml"), *depth], run=False)
    (summary,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelSummary)]
    assert type(summary) is Summary and summary._max_depth == 2
