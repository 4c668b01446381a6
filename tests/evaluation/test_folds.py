"""``vtrans.evaluation.folds``: folds by idiom, what each fold trains on, and how its latent is trained."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from vtrans.config import CrossvalConfig
from vtrans.data import DEFAULT_TEMPLATE, load_idioms
from vtrans.errors import ConfigError
from vtrans.evaluation.folds import FoldLatents, FoldPlan, assign_folds
from vtrans.latent.training import read_training_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


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


def test_a_plan_deals_every_item_to_one_fold_and_its_digest_names_items_and_folds():
    plan = FoldPlan.load("builtin", 3, fold_seed=0, max_items=30)
    assert len(plan.items) == 30 and plan.extra == [] and plan.n_extra_dropped == 0
    for fold in range(3):
        assert sorted(plan.inside(fold) + plan.outside(fold)) == list(range(30))
        assert not set(plan.inside(fold)) & set(plan.outside(fold))
    assert plan.digest() == FoldPlan.load("builtin", 3, fold_seed=0, max_items=30).digest()
    assert plan.digest() != FoldPlan.load("builtin", 3, fold_seed=1, max_items=30).digest()
    assert plan.digest() != FoldPlan.load("builtin", 3, fold_seed=0, max_items=31).digest()
    with pytest.raises(ConfigError, match="too few for 3 folds"):
        FoldPlan.load("builtin", 3, max_items=5)
    with pytest.raises(ConfigError, match="every idiom of a set"):
        FoldPlan.load("builtin:test", 3)


def test_a_fold_trains_where_the_config_says_unless_a_device_is_named(tmp_path, tiny_gpt2):
    cfg = CrossvalConfig(config=str(TINY), folds=2, seeds=[0], epochs=2)
    latents = FoldLatents(cfg, read_training_config(TINY), DEFAULT_TEMPLATE, tmp_path)
    assert latents.device == "cpu"  # tiny.yaml: accelerator cpu
    assert latents.backbone.fingerprint() == tiny_gpt2.fingerprint()
    settings = latents.overrides(7)
    assert (settings["seed_everything"], settings["data.seed"], settings["trainer.max_epochs"]) == (7, 7, 2)
    assert settings["trainer.logger"] is False and settings["trainer.enable_checkpointing"] is False
    assert settings["trainer.limit_val_batches"] == 0 and settings["trainer.default_root_dir"] == str(tmp_path)
    assert not any(key in settings for key in ("trainer.accelerator", "trainer.devices", "trainer.precision"))
    latents.asked = "cuda:1"  # the mapping alone (no GPU here to build on)
    named = latents.overrides(0)
    assert (named["trainer.accelerator"], named["trainer.devices"], named["trainer.strategy"]) == ("gpu", [1], "auto")
    latents.asked = "cpu"
    assert (latents.overrides(0)["trainer.accelerator"], latents.overrides(0)["trainer.devices"]) == ("cpu", 1)


def test_a_config_that_trains_in_several_processes_is_refused(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["devices"] = 2
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = CrossvalConfig(config=str(path), folds=2, seeds=[0])
    with pytest.raises(ConfigError, match="trains in 2 processes"):
        FoldLatents(cfg, read_training_config(path), DEFAULT_TEMPLATE, tmp_path)
