"""The calibration a checkpoint carries: fitted by ``Calibrate`` on the validation split during
training, saved in the checkpoint and in a ``save_pretrained`` folder, turned into every scored
record's ``p_wrong``; a latent without one says why, and its records have no ``p_wrong``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from vtrans.data import DEFAULT_TEMPLATE, IdiomItem, load_split, render_prompt
from vtrans.estimators.runner import Completer
from vtrans.latent import checkpoint
from vtrans.latent.calibrate import Calibrate
from vtrans.latent.calibration import Calibration
from vtrans.latent.datamodule import IdiomDataModule
from vtrans.latent.model import LatentModel
from vtrans.latent.module import LatentLM
from vtrans.scoring.scorer import Scorer


def _half_right(backbone, items: list[IdiomItem]) -> list[IdiomItem]:
    """The items, every other one's target made the base model's own greedy word (so it is correct)."""
    completions = Completer(backbone, progress=False).complete([render_prompt(DEFAULT_TEMPLATE, it.prefix) for it in items])
    out = []
    for i, (item, done) in enumerate(zip(items, completions, strict=True)):
        if i % 2 == 0 and done.word:
            item = IdiomItem(f"{item.prefix} {done.word}", item.prefix, done.word)
        out.append(item)
    return out


def _fit(backbone, val: list[IdiomItem], folder, callbacks=(), **trainer) -> None:
    train = load_split("builtin", "train")[:16]
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=folder, callbacks=[*callbacks, ModelCheckpoint(dirpath=folder, save_last=True)], **trainer,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(LatentLM(backbone, d_z=4, hidden=16), IdiomDataModule.from_items(train, val, batch_size=8))


@pytest.fixture(scope="module")
def calibrated(tiny_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated")
    val = _half_right(tiny_gpt2, load_split("builtin", "val")[:40])
    _fit(tiny_gpt2, val, folder, [Calibrate()])
    return folder / "last.ckpt", val


def test_the_checkpoint_carries_the_map_fitted_on_its_validation_split_at_its_step(calibrated, tiny_gpt2):
    path, val = calibrated
    ckpt = checkpoint.read(path)
    fitted = Calibration.from_dict(ckpt["calibration"])
    _, _, correct = Completer(tiny_gpt2, progress=False).label(val, DEFAULT_TEMPLATE)
    assert 10 <= sum(correct) <= 30  # the construction gives both classes
    assert (fitted.estimator, fitted.n, fitted.n_wrong) == ("adapter_nll", len(val), len(val) - sum(correct))
    assert fitted.step == ckpt["global_step"] and fitted.method in ("platt", "isotonic")
    assert fitted.cv_brier[fitted.method] == min(fitted.cv_brier.values())
    assert "calibration_missing" not in ckpt


def test_every_record_carries_p_wrong_from_that_map_whatever_estimators_are_asked(calibrated, tiny_gpt2):
    path, val = calibrated
    prompts = [it.prefix for it in val]
    asked = list(Scorer.from_checkpoint(path, estimators=["msp"], backbone=tiny_gpt2, quiet=True).score(prompts))
    scorer = Scorer.from_checkpoint(path, estimators=["adapter_nll"], backbone=tiny_gpt2, quiet=True)
    full = list(scorer.score(prompts))
    assert all(set(r["scores"]) == {"msp"} for r in asked)  # the score p_wrong reads is not added to what was asked
    nll = np.array([r["scores"]["adapter_nll"] for r in full])
    # the same computation on the same batches in one process: equal but for the last bits of float64
    np.testing.assert_allclose([r["p_wrong"] for r in asked], scorer.calibration(nll), rtol=1e-9)
    assert all(0.0 <= r["p_wrong"] <= 1.0 for r in asked)


def test_a_save_pretrained_folder_keeps_the_map(calibrated, tiny_gpt2, tmp_path):
    path, val = calibrated
    model = checkpoint.load(path, backbone=tiny_gpt2)
    model.save_pretrained(tmp_path / "latent")
    back = LatentModel.from_pretrained(tmp_path / "latent", backbone=tiny_gpt2)
    assert back.calibration == model.calibration and back.calibration is not None
    prompts = [it.prefix for it in val[:6]]
    kw = dict(estimators=["msp"], backbone=tiny_gpt2, quiet=True)
    by_ckpt = [r["p_wrong"] for r in Scorer.from_checkpoint(path, **kw).score(prompts)]
    by_folder = [r["p_wrong"] for r in Scorer.from_pretrained(tmp_path / "latent", **kw).score(prompts)]
    assert by_folder == by_ckpt


def test_a_validation_split_of_one_class_saves_why_and_its_records_have_no_p_wrong(tiny_gpt2, tmp_path, caplog):
    val = load_split("builtin", "val")[:24]  # a random tiny model completes none of them
    _fit(tiny_gpt2, val, tmp_path, [Calibrate()])
    ckpt = checkpoint.read(tmp_path / "last.ckpt")
    assert "calibration" not in ckpt and "24 items, 24 wrong" in ckpt["calibration_missing"]
    with caplog.at_level(logging.WARNING, logger="vtrans"):
        scorer = Scorer.from_checkpoint(tmp_path / "last.ckpt", estimators=["msp"], backbone=tiny_gpt2)
    assert "no p_wrong" in caplog.text and "24 items, 24 wrong" in caplog.text
    records = list(scorer.score([it.prefix for it in val[:3]]))
    assert records and all("p_wrong" not in r for r in records)
    folder = checkpoint.load(tmp_path / "last.ckpt", backbone=tiny_gpt2).save_pretrained(tmp_path / "latent")
    assert "24 items, 24 wrong" in LatentModel.from_pretrained(folder, backbone=tiny_gpt2).calibration_missing


def test_a_run_without_the_callback_says_it_was_saved_without_one(tiny_gpt2, tmp_path, caplog):
    _fit(tiny_gpt2, load_split("builtin", "val")[:8], tmp_path)
    with caplog.at_level(logging.WARNING, logger="vtrans"):
        scorer = Scorer.from_checkpoint(tmp_path / "last.ckpt", estimators=["msp"], backbone=tiny_gpt2)
    assert scorer.calibration is None and "saved without a calibration" in caplog.text


def _evaluate(path, items, folder):
    from vtrans.config import EvalConfig
    from vtrans.evaluation.evaluate import evaluate

    (folder / "idioms.txt").write_text("".join(f"{it.idiom}\n" for it in items), encoding="utf-8")
    config = EvalConfig(data=f"txt:{folder / 'idioms.txt'}", split="all", estimators=["msp", "adapter_nll"], n_boot=100)
    results = evaluate(config, folder / "run", ckpt=str(path), progress=False)
    return results, [json.loads(line) for line in (folder / "run" / "scores.jsonl").read_text().splitlines()]


def test_evaluate_gives_the_latents_own_p_wrong_on_other_idioms_and_its_ece_there(calibrated, tiny_gpt2, tmp_path):
    path, _ = calibrated
    results, rows = _evaluate(path, _half_right(tiny_gpt2, load_split("builtin", "test")[:30]), tmp_path)
    fitted = checkpoint.load(path, backbone=tiny_gpt2).calibration
    assert results["p_wrong"]["calibration"] == fitted.to_dict() and results["p_wrong"]["n"] == len(rows)
    nll = np.array([row["scores"]["adapter_nll"] for row in rows])
    np.testing.assert_allclose([row["p_wrong"] for row in rows], fitted(nll), rtol=1e-12)
    errors = np.array([not row["correct"] for row in rows], dtype=float)
    p = np.array([row["p_wrong"] for row in rows])
    assert results["p_wrong"]["brier"] == pytest.approx(float(np.mean((p - errors) ** 2)), rel=1e-12)


def test_evaluate_on_the_idioms_it_was_fitted_on_cross_fits_instead_and_says_so(calibrated, tmp_path, caplog):
    path, val = calibrated
    with caplog.at_level(logging.WARNING, logger="vtrans"):
        results, rows = _evaluate(path, val, tmp_path)
    assert f"fitted on {len(val)} of these idioms" in caplog.text
    assert results["p_wrong"]["calibration"] is None and "cross-fitted" in results["p_wrong"]["from"]


def test_the_callbacks_score_is_the_estimators_adapter_nll(calibrated, tiny_gpt2):
    """The map is fitted on ``LatentModel.nll_at_mean`` and applied to the runner's ``adapter_nll``:
    the same quantity by two paths (one from the prompts, one from the run's shared forward), equal
    to float32 rounding of logits of size ~10 (1e-4 absolute is far above it, far below any score gap)."""
    from vtrans.estimators.runner import Runner

    path, val = calibrated
    model = checkpoint.load(path, backbone=tiny_gpt2)
    runner = Runner(tiny_gpt2, model, progress=False)
    prompts, completions, _ = runner.label(val, DEFAULT_TEMPLATE)
    expected = runner.scores(prompts, completions, ["adapter_nll"])["adapter_nll"]
    got = model.nll_at_mean(prompts, [c.first_token for c in completions])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)


def test_every_training_run_gets_the_callback(tmp_path, monkeypatch):
    from vtrans.cli import train_main

    monkeypatch.chdir(tmp_path)
    cli = train_main(["--config", str(Path(__file__).parents[2] / "configs" / "tiny.yaml"), "--trainer.logger", "false"], run=False)
    assert sum(isinstance(cb, Calibrate) for cb in cli.trainer.callbacks) == 1


def test_a_run_that_validates_on_fewer_batches_calibrates_on_those(tiny_gpt2, tmp_path):
    val = _half_right(tiny_gpt2, load_split("builtin", "val")[:40])
    _fit(tiny_gpt2, val, tmp_path, [Calibrate()], limit_val_batches=3)  # 3 batches of 8
    ckpt = checkpoint.read(tmp_path / "last.ckpt")
    record = ckpt.get("calibration") or {}
    assert record.get("n") == 24 or "24 items" in ckpt.get("calibration_missing", ""), ckpt.get("calibration_missing")
