"""``python train.py`` and ``vtrans.latent.training``: a tiny fit end to end, what its checkpoint holds,
reload, configs, user errors, and the one training path that crossval's folds and the sweep share."""

from __future__ import annotations

import csv
import inspect
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import CONFIGS, offline_env
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from vtrans.backbone.loading import Backbone
from vtrans.cli import train_main
from vtrans.config import CrossvalConfig
from vtrans.data import DEFAULT_TEMPLATE, load_idioms
from vtrans.errors import ConfigError, TrainingStopped
from vtrans.evaluation.folds import FoldLatents
from vtrans.latent import checkpoint, training
from vtrans.latent.callbacks import NonFiniteGuard
from vtrans.latent.checkpoint_io import AtomicCheckpointIO
from vtrans.latent.datamodule import IdiomDataModule
from vtrans.latent.model import LatentModel
from vtrans.latent.module import LatentLM
from vtrans.latent.saved import TRAINING_KEYS
from vtrans.latent.training import read_training_config


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv also holds arguments (pytest's own)."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: once in a blue"]
TARGETS = ["cake", "moon"]


# --------------------------------------------------------------------------- the tiny fit


def test_tiny_fit_runs_and_writes_checkpoint_and_metrics(tiny_fit):
    assert tiny_fit.proc.returncode == 0, tiny_fit.describe()
    assert "Traceback" not in tiny_fit.proc.stderr
    assert tiny_fit.ckpt.is_file()
    assert tiny_fit.ckpt.stat().st_size < 1_000_000  # the latent only, no copy of the backbone
    with tiny_fit.metrics.open() as f:
        rows = list(csv.DictReader(f))
    for column in ("val/elbo", "val/kl", "val/active_units", "val/nll", "train/loss_step"):
        assert column in rows[0], f"metrics.csv lacks {column}"
    val = [r for r in rows if r["val/elbo"]]
    assert len(val) == 1  # one epoch, one validation
    elbo, kl_item, active = (float(val[0][k]) for k in ("val/elbo", "val/kl", "val/active_units"))
    assert math.isfinite(elbo) and elbo < 0
    assert kl_item >= 0 and 0 <= active <= 8 and active == int(active)


def test_checkpoint_holds_the_latent_only(tiny_ckpt, tiny_gpt2):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert not any(k.startswith("backbone") for k in state)
    latent_keys = [k for k in state if k.startswith("latent.")]
    assert latent_keys == list(state)  # nothing else with weights either
    assert {k.split(".")[1] for k in latent_keys} == {"posterior_head", "prior_head", "proj"}
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    assert len(group["params"]) == len(latent_keys)  # the optimizer held exactly the latent's tensors
    record = ckpt["vtrans"]
    assert record["backbone"] == {"name": "tiny-gpt2", "dtype": "float32", "attn_implementation": "eager"}
    assert record["fingerprint"] == tiny_gpt2.fingerprint()
    hp = ckpt["hyper_parameters"]
    assert (hp["layer"], hp["d_z"], hp["prior"], hp["hidden"]) == (2, 8, "conditional", 32)
    assert "backbone" not in hp
    assert state["latent.proj.weight"].abs().sum() > 0  # one epoch moved the injection off zero


RELOAD = textwrap.dedent(
    """
    import sys, torch
    from vtrans.latent import checkpoint
    module = checkpoint.load(sys.argv[1])
    prompts, targets, out = sys.argv[3].split("|"), sys.argv[4].split("|"), sys.argv[2]
    enc = module.encode(prompts, module.target_ids(targets))
    z = torch.randn(len(prompts), module.settings["d_z"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = module.decode(module.lower(enc), z, enc)
    torch.save({"logits": logits, "z": z}, out)
    """
)


def test_reload_in_a_fresh_process_reproduces_the_logits(tiny_ckpt, tmp_path):
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tiny_ckpt), str(out), "|".join(PROMPTS), "|".join(TARGETS)],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(out, weights_only=True)

    module = checkpoint.load(tiny_ckpt)
    saved = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in module.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key], atol=0, rtol=0)
    assert not module.training
    enc = module.encode(PROMPTS, module.target_ids(TARGETS))
    with torch.no_grad():
        h = module.lower(enc)
        logits = module.decode(h, fresh["z"], enc)
        other = module.decode(h, fresh["z"] + 1.0, enc)
    torch.testing.assert_close(fresh["logits"], logits, atol=0, rtol=0)
    assert (other - logits).abs().max() > 0  # the trained latent is not a no-op: z matters


def test_a_checkpoint_loads_as_the_plain_model_to_score_and_as_the_lightning_module_to_train(tiny_ckpt, tiny_gpt2):
    scoring = checkpoint.load(tiny_ckpt, backbone=tiny_gpt2)
    training = checkpoint.load(tiny_ckpt, backbone=tiny_gpt2, training=True)
    assert type(scoring) is LatentModel and type(training) is LatentLM and type(training.model) is LatentModel
    raw = checkpoint.read(tiny_ckpt)["state_dict"]
    assert list(scoring.state_dict()) == list(training.state_dict()) == list(raw)  # the latent's keys, as written
    for key, value in scoring.state_dict().items():
        torch.testing.assert_close(value, training.state_dict()[key], atol=0, rtol=0)
    assert scoring.settings == training.model.settings  # every recorded setting, the training ones too
    assert {k: training.hparams[k] for k in scoring.settings} == scoring.settings  # and Lightning's record of them
    assert scoring.settings["d_z"] == training.hparams.d_z == 8 and scoring.device == training.model.device
    assert not scoring.training and not training.training


def test_the_training_settings_are_latent_lm_s_arguments_beyond_latent_model_s():
    """``saved.TRAINING_KEYS`` names them so that scoring need not import LatentLM (Lightning)."""
    model = set(inspect.signature(LatentModel).parameters)
    lm = set(inspect.signature(LatentLM).parameters)
    assert model <= lm and lm - model == set(TRAINING_KEYS)


# --------------------------------------------------------------------------- configs


def _print_config(path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_:
        train_main(["fit", "--config", str(path), "--print_config"])
    out = capsys.readouterr()
    assert exit_.value.code in (0, None), out.err[-2000:]
    return yaml.safe_load(out.out)


COMMAND_CONFIGS = {"eval.yaml"}  # `vtrans evaluate --config` files: parsed in test_cli_config.py


@pytest.mark.parametrize(
    "path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in COMMAND_CONFIGS), ids=lambda p: p.name
)
def test_every_config_parses(path, capsys):
    """``--print_config`` parses and validates the YAML without building the model (offline-safe)."""
    config = _print_config(path, capsys)
    backbone = config["model"]["backbone"]
    assert backbone["class_path"] == "vtrans.backbone.loading.Backbone"
    assert backbone["init_args"]["name"]
    assert config["data"]["data"]


def test_gpt2_xl_config_is_the_papers_setting(capsys):
    config = _print_config(CONFIGS / "gpt2-xl.yaml", capsys)
    backbone = config["model"]["backbone"]["init_args"]
    assert backbone == {"name": "gpt2-xl", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert config["model"]["layer"] == 24  # the middle of GPT-2 XL's 48 blocks
    trainer = config["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", 1, "bf16-mixed")


def test_gpt2_xl_random_is_the_papers_setting_on_random_weights(capsys):
    paper, random = _print_config(CONFIGS / "gpt2-xl.yaml", capsys), _print_config(CONFIGS / "gpt2-xl-random.yaml", capsys)
    assert random["model"]["backbone"]["init_args"] == {"name": "random:gpt2-xl", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    for config in (paper, random):
        del config["model"]["backbone"]["init_args"]["name"], config["trainer"]["logger"], config["trainer"]["callbacks"]
    assert random == paper


def test_gemma3_config_is_smollm2_s_on_gemma3_s_middle_block(capsys):
    smollm2, gemma = _print_config(CONFIGS / "smollm2.yaml", capsys), _print_config(CONFIGS / "gemma3-270m.yaml", capsys)
    assert gemma["model"]["backbone"]["init_args"]["name"] == "gemma3-270m"
    assert gemma["model"]["layer"] == 9  # the middle of Gemma 3 270M's 18 blocks
    assert (gemma["model"]["d_z"], gemma["model"]["hidden"]) == (16, 256)
    for config in (smollm2, gemma):
        del config["model"]["backbone"]["init_args"]["name"], config["model"]["layer"]
        del config["trainer"]["logger"], config["trainer"]["callbacks"]
    assert gemma == smollm2


@pytest.mark.parametrize("latent", ["tiny", "smollm2", "gemma3-270m"])
def test_each_twin_config_is_its_latent_s_with_a_deterministic_z(latent, capsys):
    """The twin differs from the latent it is compared with in ``prior`` alone (and where it logs and saves)."""
    model, twin = _print_config(CONFIGS / f"{latent}.yaml", capsys), _print_config(CONFIGS / f"{latent}-twin.yaml", capsys)
    assert (model["model"]["prior"], twin["model"]["prior"]) == ("conditional", "deterministic")
    for config in (model, twin):
        del config["model"]["prior"], config["trainer"]["logger"], config["trainer"]["callbacks"]
    assert twin == model


def test_a_misspelled_config_key_is_refused(tmp_path, capsys):
    bad = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    bad["model"]["d_zz"] = bad["model"].pop("d_z")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as exit_:
        train_main(["fit", "--config", str(path), "--print_config"])
    assert exit_.value.code not in (0, None)
    assert "d_zz" in capsys.readouterr().err


# --------------------------------------------------------------------------- user errors


def _bad_line_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a piece of cake\noneword\n")
    return f"txt:{path}"


USER_ERRORS = {
    "unknown-model": (["--model.backbone.init_args.name", "nope-model"], "unknown model or missing folder 'nope-model'"),
    "missing-file": (["--data.data", "txt:/nonexistent/idioms.txt"], "/nonexistent/idioms.txt"),
    "malformed-line": (["--data.data", _bad_line_file], ":2:"),
    "d_z-zero": (["--model.d_z", "0"], "d_z must be >= 1, got 0"),
    "layer-out-of-range": (["--model.layer", "99"], "layer must be in 1..3, got 99"),
}


def _stderr_contract(err: str, expected: str) -> None:
    """One ``error:`` line, the last on stderr, naming the problem; no traceback."""
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err[-2000:]
    assert err.strip().splitlines()[-1] == error_lines[0]
    assert expected in error_lines[0]


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_exit_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    args, expected = USER_ERRORS[case]
    args = [a(tmp_path) if callable(a) else a for a in args]
    monkeypatch.chdir(tmp_path)  # tiny.yaml writes runs/ and checkpoints/ relative to here
    with pytest.raises(SystemExit) as exit_:
        train_main(
            ["fit", "--config", str(CONFIGS / "tiny.yaml"), "--trainer.max_epochs", "1"]
            + ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *args]
        )
    assert exit_.value.code == 2
    _stderr_contract(capsys.readouterr().err, expected)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_user_error_in_a_real_process(run_train, tmp_path):
    proc = run_train("fit", "--config", CONFIGS / "tiny.yaml", "--model.backbone.init_args.name", "nope", cwd=tmp_path)
    assert proc.returncode == 2
    _stderr_contract(proc.stderr, "unknown model or missing folder 'nope'")


# --------------------------------------------------------------------------- one training path


def test_build_makes_the_module_data_and_trainer_train_py_makes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = train_main(["--config", str(CONFIGS / "tiny.yaml"), "--trainer.logger", "false"], run=False)
    built = training.build(CONFIGS / "tiny.yaml", {"trainer.logger": False})

    def callbacks(trainer):
        return sorted(type(cb).__name__ for cb in trainer.callbacks if not isinstance(cb, SaveConfigCallback))

    assert callbacks(built.trainer) == callbacks(cli.trainer)
    assert {"ModelCheckpoint", "ResumableRNG", "NonFiniteGuard"} <= set(callbacks(built.trainer))
    assert type(built.trainer.strategy.checkpoint_io) is type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert type(built.trainer.accelerator) is type(cli.trainer.accelerator)
    for setting in ("precision", "num_devices", "max_epochs", "log_every_n_steps", "world_size"):
        assert getattr(built.trainer, setting) == getattr(cli.trainer, setting), setting
    assert dict(built.module.hparams) == dict(cli.model.hparams)
    assert dict(built.datamodule.hparams) == dict(cli.datamodule.hparams)
    assert not list(tmp_path.rglob("*.yaml"))  # building writes nothing


def test_build_takes_overrides_a_loaded_backbone_and_a_fold_s_items(tiny_gpt2):
    items = load_idioms("builtin")[:20]
    overrides = {"trainer.enable_checkpointing": False, "trainer.logger": False, "model.d_z": 4, "data.seed": 5}
    built = training.build(CONFIGS / "tiny.yaml", overrides, items=items, backbone=tiny_gpt2)
    assert built.module.model.backbone is tiny_gpt2 and built.module.hparams.d_z == 4
    assert not any(isinstance(cb, ModelCheckpoint) for cb in built.trainer.callbacks)  # the config's is left out
    assert built.datamodule.items["train"] == items and built.datamodule.items["val"] == []
    assert (built.datamodule.hparams.batch_size, built.datamodule.hparams.seed) == (16, 5)
    for bad, named in (({"model.backbone.init_args.name": "tiny-llama"}, "tiny-llama"), ({"model.d_zz": 4}, "d_zz")):
        with pytest.raises(ConfigError, match=named) as err:
            training.build(CONFIGS / "tiny.yaml", bad, backbone=tiny_gpt2)
        assert "\n" not in str(err.value)


def test_build_takes_a_loaded_backbone_with_random_weights():
    """Its spec says ``"weights": "random"``, which the config's name implies: the two agree."""
    from vtrans.backbone.loading import Backbone

    backbone = Backbone("random:tiny-gpt2")
    overrides = {"trainer.enable_checkpointing": False, "trainer.logger": False, "model.backbone.init_args.name": "random:tiny-gpt2"}
    built = training.build(CONFIGS / "tiny.yaml", overrides, items=load_idioms("builtin")[:20], backbone=backbone)
    assert built.module.model.backbone is backbone and built.module.model.backbone.spec["weights"] == "random"


def _seeded_tiny(tmp_path) -> str:
    """tiny.yaml seeded 3 (generators, split and shuffle), two epochs, no validation or logger,
    its checkpoints in ``tmp_path/checkpoints``."""
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["seed_everything"] = 3
    config["data"]["seed"] = 3
    config["trainer"].update(max_epochs=2, logger=False, limit_val_batches=0, num_sanity_val_steps=0)
    config["trainer"].update(enable_progress_bar=False, enable_model_summary=False)
    config["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(tmp_path / "checkpoints"), monitor=None)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_fold_latent_is_the_latent_train_py_trains_from_the_same_config_seed_and_items(tmp_path, monkeypatch):
    """One path: the same computations in the same order, so the same latent to the last bit."""
    monkeypatch.chdir(tmp_path)
    config = _seeded_tiny(tmp_path)
    train_main(["fit", "--config", config])
    data = IdiomDataModule(data="builtin", batch_size=16, seed=3, max_items=64)  # tiny.yaml's, seeded 3
    data.setup("fit")
    latents = FoldLatents(CrossvalConfig(config=config, folds=2, seeds=[3]), read_training_config(config),
                          DEFAULT_TEMPLATE, tmp_path / "cv")
    latents.latent(3, 0, data.items["train"])
    fitted = checkpoint.read(tmp_path / "checkpoints" / "last.ckpt")
    fold = checkpoint.read(tmp_path / "cv" / "units" / "seed3-fold0.ckpt")
    assert fitted["global_step"] == fold["global_step"] == 2 * 4  # 64 idioms, 16 a batch, two epochs
    assert fitted["state_dict"].keys() == fold["state_dict"].keys()
    for key, value in fitted["state_dict"].items():
        assert torch.equal(value, fold["state_dict"][key]), key
    assert fitted["IdiomDataModule"] == fold["IdiomDataModule"]  # the training idioms each records
    assert checkpoint.hyper_parameters(fitted) == checkpoint.hyper_parameters(fold)


def test_a_non_finite_stop_becomes_training_stopped_naming_the_step():
    guard = NonFiniteGuard()
    guard.stage, guard.step = "train", 5
    with pytest.raises(TrainingStopped, match="^non-finite gradient of w at train step 5$"):
        with training.stopping(guard):
            raise FloatingPointError("non-finite gradient of w at train step 5")
    with pytest.raises(TrainingStopped, match="^non-finite values at train step 5: Expected parameter loc"):
        with training.stopping(guard):
            raise ValueError("Expected parameter loc (Tensor of shape (2,)) to satisfy ... but found invalid values:\nnan")
    with pytest.raises(ConfigError):  # a user's error is not a stop, whatever it says
        with training.stopping(guard):
            raise ConfigError("lr has invalid values")


def test_training_config_is_read_and_checked(tmp_path):
    spec = read_training_config(CONFIGS / "tiny.yaml")
    assert spec.backbone == {"name": "tiny-gpt2"} and spec.model["d_z"] == 8 and spec.max_epochs == 3
    bad = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    bad["model"]["not_a_setting"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="not_a_setting"):
        read_training_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        read_training_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- bf16


def _bf16_fit_step(accelerator: str, tmp_path) -> None:
    import lightning as L

    from vtrans.latent.datamodule import IdiomDataModule
    from vtrans.latent.module import LatentLM

    L.seed_everything(0)
    backbone = Backbone("tiny-gpt2", dtype="bfloat16", attn_implementation="sdpa")
    module = LatentLM(backbone, d_z=4, hidden=16, lr=1e-2)
    before = module.model.latent.proj.weight.detach().clone()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, IdiomDataModule(batch_size=4, max_items=8))
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss), loss
    assert module.model.backbone.model.lm_head.weight.dtype == torch.bfloat16
    assert not torch.equal(module.model.latent.proj.weight.detach().cpu(), before)  # it trained
    assert all(p.dtype == torch.float32 for p in module.model.latent.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_bf16_fit_step_on_gpu(tmp_path):
    _bf16_fit_step("gpu", tmp_path)


# --------------------------------------------------------------------------- configs of the flat layout


def test_a_config_naming_classes_by_the_flat_layout_s_paths_is_refused_with_the_paths_to_write(tmp_path, capsys):
    text = (CONFIGS / "tiny.yaml").read_text(encoding="utf-8")
    old = tmp_path / "old.yaml"
    old.write_text(text.replace("vtrans.backbone.loading.Backbone", "vtrans.loading.Backbone"), encoding="utf-8")
    assert old.read_text() != text
    fix = r"replace vtrans\.loading\.Backbone -> vtrans\.backbone\.loading\.Backbone"
    with pytest.raises(ConfigError, match=fix):
        training.read_yaml(old)
    with pytest.raises(ConfigError, match=fix):
        training.build(yaml.safe_load(old.read_text()))
    with pytest.raises(SystemExit) as stopped:
        train_main(["fit", "--config", str(old)])
    assert stopped.value.code == 2 and "vtrans.backbone.loading.Backbone" in capsys.readouterr().err
    for path in sorted(CONFIGS.glob("*.yaml")):  # the configs of this version name none
        training.refuse_flat_layout(path.read_text(encoding="utf-8"), str(path))
    training.refuse_flat_layout("class_path: vtrans.backbone.loading.Backbone\n", "a present path")  # no false match
