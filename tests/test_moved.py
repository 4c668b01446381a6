"""The module paths of the flat layout still import, as the modules they became (``vtrans.moved``).

Training configs, the ``config.yaml`` beside a run's logs and code of one's own name classes by
their old paths (``vtrans.loading.Backbone``, ``vtrans.checkpoint_io.AtomicCheckpointIO``, ...).
``tests/fixtures/old_layout`` holds ``configs/tiny.yaml`` as it was before the layout by layer
and the ``last.ckpt`` that the code of then wrote from it: the checkpoint loads to score, and
training resumes from it under the old YAML.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TRAIN_PY, offline_env

from vtrans.moved import MOVED

OLD = REPO / "tests" / "fixtures" / "old_layout"

CLASS_PATHS = {  # what configs, run folders and checkpoints of the flat layout name -> where it is now
    "vtrans.loading.Backbone": "vtrans.backbone.loading.Backbone",
    "vtrans.checkpoint_io.AtomicCheckpointIO": "vtrans.latent.checkpoint_io.AtomicCheckpointIO",
    "vtrans.checkpoint.AtomicCheckpointIO": "vtrans.latent.checkpoint_io.AtomicCheckpointIO",
    "vtrans.callbacks.NonFiniteGuard": "vtrans.latent.callbacks.NonFiniteGuard",
    "vtrans.callbacks.ResumableRNG": "vtrans.latent.callbacks.ResumableRNG",
    "vtrans.callbacks.Summary": "vtrans.latent.callbacks.Summary",
    "vtrans.module.LatentLM": "vtrans.latent.module.LatentLM",
    "vtrans.datamodule.IdiomDataModule": "vtrans.latent.datamodule.IdiomDataModule",
    "vtrans.model.LatentModel": "vtrans.latent.model.LatentModel",
    "vtrans.scorer.Scorer": "vtrans.scoring.scorer.Scorer",
    "vtrans.config.EstimatorConfig": "vtrans.config.EstimatorConfig",
    "vtrans.config.EvalConfig": "vtrans.config.EvalConfig",
    "vtrans.config.CrossvalConfig": "vtrans.config.CrossvalConfig",
}


def _resolve(path: str):
    """A ``class_path`` as jsonargparse resolves one: import the module, then get the name."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_old_module_path_imports_as_its_new_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__name__ == module.__spec__.name == MOVED[old]  # it keeps its own name and spec
    assert MOVED[old] not in MOVED  # a real module, found where it is


@pytest.mark.parametrize("old", sorted(CLASS_PATHS))
def test_the_class_paths_that_configs_and_runs_name_resolve_to_the_classes(old):
    assert _resolve(old) is _resolve(CLASS_PATHS[old])


def test_old_paths_import_first_in_a_fresh_interpreter():
    """What a saved config does: the old path is the first thing imported, before anything new."""
    code = (
        "import vtrans.loading, vtrans.checkpoint_io, vtrans.module\n"
        "from vtrans.latent import module\n"
        "from vtrans.backbone import loading\n"
        "assert vtrans.loading is loading and vtrans.module is module\n"
        "assert vtrans.checkpoint_io.AtomicCheckpointIO.__module__ == 'vtrans.latent.checkpoint_io'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_checkpoint_written_before_the_layout_loads_to_score(tiny_gpt2):
    from vtrans.latent import checkpoint

    ckpt = checkpoint.read(OLD / "tiny.ckpt")
    if ckpt["vtrans"]["fingerprint"] != tiny_gpt2.fingerprint():  # not the layout's doing: the weights themselves
        pytest.skip("tiny-gpt2's random weights differ under this transformers version: write the fixture again")
    module = checkpoint.load(OLD / "tiny.ckpt", backbone=tiny_gpt2)
    assert module.hparams.d_z == 8 and module.template == "Complete the idiom: {prefix}"
    assert checkpoint.trained_idiom_hashes(OLD / "tiny.ckpt")  # the DataModule's state, under its class name
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value)


@pytest.mark.slow
def test_training_resumes_from_a_checkpoint_of_the_flat_layout_under_its_old_config(tiny_gpt2, tmp_path):
    """``train.py fit --config OLD.yaml --ckpt_path OLD.ckpt``: the old class paths build the run, the
    checkpoint restores it (weights, optimizer, loops, random states, training idioms) and one more
    epoch trains."""
    from vtrans.latent import checkpoint

    if checkpoint.read(OLD / "tiny.ckpt")["vtrans"]["fingerprint"] != tiny_gpt2.fingerprint():
        pytest.skip("tiny-gpt2's random weights differ under this transformers version: write the fixture again")
    args = ["fit", "--config", str(OLD / "tiny.yaml"), "--ckpt_path", str(OLD / "tiny.ckpt"), "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *args], cwd=tmp_path, capture_output=True, text=True,
                          env=offline_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(tmp_path / "checkpoints" / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 4)
    assert resumed["vtrans"] == checkpoint.read(OLD / "tiny.ckpt")["vtrans"]  # the same backbone, by spec and fingerprint
    saved = (tmp_path / "runs" / "tiny" / "version_0" / "config.yaml").read_text()
    assert "class_path: vtrans.loading.Backbone" in saved  # the run's own config names them as given


def test_a_config_rewritten_to_the_new_paths_is_the_content_a_run_recorded_before_the_move(tmp_path):
    """A cross-fitted run records its training YAML's content; the configs' class paths moved to
    the new modules, and the runs recorded before must still resume: the record spells class
    paths as the flat layout did, so both spellings give the recorded digest of the old file."""
    import hashlib

    from vtrans.evaluation.crossval import config_digest

    old = "model:\n  backbone:\n    class_path: vtrans.loading.Backbone\n    init_args: {name: tiny-gpt2}\r\n"
    new = old.replace("vtrans.loading.Backbone", "vtrans.backbone.loading.Backbone")
    (tmp_path / "old.yaml").write_bytes(old.encode())
    (tmp_path / "new.yaml").write_bytes(new.encode())
    recorded = hashlib.sha256(old.encode()).hexdigest()[:16]  # how a run before the move recorded it: its bytes
    assert config_digest(tmp_path / "old.yaml") == config_digest(tmp_path / "new.yaml") == recorded
    (tmp_path / "other.yaml").write_bytes(new.replace("tiny-gpt2", "tiny-llama").encode())
    assert config_digest(tmp_path / "other.yaml") != recorded
