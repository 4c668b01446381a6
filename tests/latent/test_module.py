"""``vtrans.latent.module.LatentLM`` under Lightning: a quiet start of training, one name per metric.

The frozen backbone is in eval mode on purpose; Lightning's warning about modules in eval mode
is silenced for exactly its modules, and still fires for any other module left in eval mode.
"""

from __future__ import annotations

import csv
import warnings

import lightning as L
import pytest

from vtrans.latent.datamodule import IdiomDataModule
from vtrans.latent.module import LatentLM

METRICS = {
    "epoch",
    "step",
    "train/loss_step",
    "train/loss_epoch",
    "train/beta",
    *(f"{stage}/{name}" for stage in ("train", "val") for name in ("nll", "kl", "elbo")),
    *(f"{stage}/{name}" for stage in ("train", "val") for name in ("kl_dim_max", "kl_dim_min", "active_units", "active_fraction")),
    "val/loss",
}
EVAL_MODE = "module(s) in eval mode at the start of training"


def test_tiny_fit_says_nothing_about_eval_mode(tiny_fit):
    assert tiny_fit.proc.returncode == 0, tiny_fit.describe()
    assert EVAL_MODE not in tiny_fit.proc.stderr
    assert ".py:" not in tiny_fit.proc.stderr, tiny_fit.describe()  # no warning, which names its file and line


def test_tiny_fit_writes_one_column_per_metric(tiny_fit):
    with tiny_fit.metrics.open() as f:
        columns = next(csv.reader(f))
    assert set(columns) == METRICS
    assert len({c.replace("/", "_") for c in columns}) == len(columns)  # no metric under a second spelling


def _fit_one_step(module: LatentLM, tmp_path) -> list[str]:
    """Fit one step; the messages of the warnings it raised (with the process's filters restored after)."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, IdiomDataModule(batch_size=4, max_items=8))
    return [str(w.message) for w in caught]


def test_the_frozen_backbone_in_eval_mode_raises_no_warning(tiny_gpt2, tmp_path):
    module = LatentLM(tiny_gpt2, d_z=4, hidden=16)
    assert not tiny_gpt2.training and not any(m.training for m in tiny_gpt2.modules())
    assert not [m for m in _fit_one_step(module, tmp_path) if EVAL_MODE in m]
    assert not tiny_gpt2.training  # still frozen after training: its dropout stayed off


def test_the_warning_filter_lasts_only_until_training_starts(tiny_gpt2, tmp_path):
    module = LatentLM(tiny_gpt2, d_z=4, hidden=16)
    before = list(warnings.filters)
    seen = []

    class During(L.Callback):  # Lightning's check runs between on_fit_start and on_train_start
        def on_train_start(self, trainer, pl_module):
            seen.append(list(warnings.filters))

    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[During()],
    )
    trainer.fit(module, IdiomDataModule(batch_size=4, max_items=8))
    assert len(seen) == 1 and len(seen[0]) == len(before) + 1  # the callback runs before the module's hook
    assert warnings.filters == before  # the process's filters as they were: nothing left installed


def test_a_trainable_module_left_in_eval_mode_still_warns(tiny_gpt2, tmp_path):
    module = LatentLM(tiny_gpt2, d_z=4, hidden=16)
    module.model.latent.proj.eval()
    in_eval = sum(1 for m in module.modules() if not m.training)
    messages = [m for m in _fit_one_step(module, tmp_path) if EVAL_MODE in m]
    assert messages and f"Found {in_eval} module(s)" in messages[0]


@pytest.mark.parametrize("stage", ["train", "val"])
def test_kl_per_item_is_logged_once(tiny_gpt2, stage):
    """``{stage}/kl`` is the mean KL per item; the latent's statistics add no second name for it."""
    module = LatentLM(tiny_gpt2, d_z=4, hidden=16)
    names = []
    module.log = lambda name, *args, **kwargs: names.append(name)
    module.log_dict = lambda values, *args, **kwargs: names.extend(values)
    module._shared_step({"prompt": ["Complete the idiom: a piece of"], "target": ["cake"]}, stage)
    module._log_stats(stage)
    assert names.count(f"{stage}/kl") == 1
    assert not [n for n in names if "kl_item" in n]
