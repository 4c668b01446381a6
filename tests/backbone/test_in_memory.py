"""A model already in memory (``Backbone.from_model``), and latents saved the Hugging Face way
(``LatentModel.save_pretrained`` / ``from_pretrained``: safetensors beside JSON, no pickle).

The user's model here is tiny-gpt2 written by ``save_pretrained`` and loaded back with
``AutoModelForCausalLM.from_pretrained``, as a user loads their own: the same weights as
``Backbone("tiny-gpt2")``, in another object, which vtrans never loaded by name.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import offline_env
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from vtrans.backbone.files import gpt2_tokenizer
from vtrans.backbone.loading import Backbone
from vtrans.cli import main
from vtrans.config import EvalConfig
from vtrans.data import DEFAULT_TEMPLATE
from vtrans.errors import BackboneError, CheckpointError, ConfigError
from vtrans.evaluation.evaluate import evaluate
from vtrans.latent import checkpoint
from vtrans.latent.datamodule import IdiomDataModule
from vtrans.latent.model import LatentModel
from vtrans.latent.module import LatentLM
from vtrans.scoring.scorer import Scorer

PROMPTS = ["spill the", "once in a blue", "the early bird catches the"]
SCORING = dict(estimators=["msp", "lens_ce", "posterior_var", "latent_mi", "latent_nll"], samples=4, batch_size=2)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_gpt2) -> Path:
    """tiny-gpt2's weights and tokenizer, written as a user's own model folder."""
    folder = tmp_path_factory.mktemp("user-model")
    tiny_gpt2.model.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    return folder


def user_model(folder: Path, **kwargs):
    """The model and tokenizer as a user loads them: transformers alone, in train mode, trainable."""
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).train()
    assert model.config.n_layer == 4 and all(p.requires_grad for p in model.parameters())
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def in_memory(model_folder) -> Backbone:
    return Backbone.from_model(*user_model(model_folder), name="my-gpt2")


@pytest.fixture(scope="module")
def fit(in_memory, tmp_path_factory) -> tuple[LatentModel, Path]:
    """A latent trained two steps on the model in memory, by Lightning, as a user would train
    it, and the checkpoint Lightning wrote of it."""
    torch.manual_seed(0)
    module = LatentLM(in_memory, d_z=4, hidden=16, lr=0.05)
    root = tmp_path_factory.mktemp("fit")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, IdiomDataModule(batch_size=4, max_items=8))
    trainer.save_checkpoint(root / "last.ckpt")
    assert module.model.latent.proj.weight.abs().sum() > 0  # trained: z now moves the logits
    return module.model.eval(), root / "last.ckpt"


@pytest.fixture(scope="module")
def trained(fit) -> LatentModel:
    return fit[0]


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> Path:
    return trained.save_pretrained(tmp_path_factory.mktemp("saved") / "my-latent", template=DEFAULT_TEMPLATE)


def records(scorer: Scorer) -> list[dict]:
    return list(scorer.score(PROMPTS))


# --------------------------------------------------------------------------- Backbone.from_model


def test_from_model_has_the_fingerprint_of_the_same_weights_loaded_by_name(tiny_gpt2, model_folder) -> None:
    assert Backbone.from_model(tiny_gpt2.model, tiny_gpt2.tokenizer).fingerprint() == tiny_gpt2.fingerprint()
    model, tokenizer = user_model(model_folder)
    assert model is not tiny_gpt2.model
    assert Backbone.from_model(model, tokenizer).fingerprint() == tiny_gpt2.fingerprint()
    # other weights, other fingerprint: the same model rounded to bfloat16 is not the model a latent was trained on
    assert Backbone.from_model(model.to(torch.bfloat16), tokenizer).fingerprint() != tiny_gpt2.fingerprint()


def test_from_model_wraps_the_model_where_it_is_and_freezes_it(model_folder) -> None:
    model, tokenizer = user_model(model_folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    tokenizer.pad_token, tokenizer.padding_side = None, "right"
    first = next(model.parameters())
    backbone = Backbone.from_model(model, tokenizer)
    assert backbone.model is model and backbone.tokenizer is tokenizer
    assert next(model.parameters()) is first and first.dtype == torch.bfloat16  # neither copied nor cast
    assert backbone.device == first.device
    assert not any(p.requires_grad for p in model.parameters())
    backbone.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
    assert backbone.spec == {
        "name": str(model_folder),  # the config's _name_or_path: where the user loaded it from
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "source": "memory",
    }
    assert (backbone.family, backbone.n_layers, backbone.d_model) == ("gpt2", 4, 64)


def _bert():
    config = AutoConfig.for_model(
        "bert", vocab_size=50257, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True
    )
    return AutoModelForCausalLM.from_config(config)


def _no_head(folder):
    return AutoModel.from_pretrained(folder)


def _tokenizer_without_pad_or_eos():
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token = None
    return tokenizer


@pytest.mark.parametrize(
    "what, message",
    [
        ("a tensor", "from_model takes a Hugging Face causal LM"),
        ("an unsupported architecture", "unsupported architecture 'bert': vtrans supports"),
        ("a model without its LM head", "has no unembedding (LM head): load it with AutoModelForCausalLM"),
        ("no pad or EOS token", "the tokenizer has neither a pad token nor an EOS token"),
        ("another model's tokenizer", "pass the model's own tokenizer"),
    ],
)
def test_from_model_refuses_what_it_cannot_use_in_one_line(model_folder, what, message) -> None:
    model, tokenizer = user_model(model_folder)
    if what == "a tensor":
        model = torch.ones(3)
    elif what == "an unsupported architecture":
        model = _bert()
    elif what == "a model without its LM head":
        model = _no_head(model_folder)
    elif what == "no pad or EOS token":
        tokenizer = _tokenizer_without_pad_or_eos()
    else:
        tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(BackboneError) as info:
        Backbone.from_model(model, tokenizer)
    assert message in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- save_pretrained / from_pretrained


def test_the_folder_holds_safetensors_and_json_only_and_no_backbone_weight(saved, trained, in_memory) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    weights = load_file(saved / "model.safetensors")
    assert sorted(weights) == sorted(trained.state_dict()) and all(k.startswith("latent.") for k in weights)
    backbone_bytes = sum(p.numel() * p.element_size() for p in in_memory.model.parameters())
    assert (saved / "model.safetensors").stat().st_size < backbone_bytes / 20
    assert not (saved / "model.safetensors").read_bytes().startswith((b"\x80", b"PK"))  # neither a pickle nor torch's zip
    config = json.loads((saved / "config.json").read_text())
    assert config == {
        "format": "vtrans-latent",
        "format_version": 1,
        "settings": dict(trained.settings),
        "backbone": {"name": "my-gpt2", "dtype": "float32", "attn_implementation": "sdpa", "source": "memory"},  # as loaded
        "fingerprint": in_memory.fingerprint(),
        "template": DEFAULT_TEMPLATE,
        "calibration_missing": trained.calibration_missing,  # trained by a Trainer of its own, with no Calibrate
    }
    assert config["settings"]["d_z"] == 4 and config["settings"]["lr"] == 0.05  # the training settings too


def test_from_pretrained_gives_the_same_weights_and_the_same_scores(saved, trained, in_memory, monkeypatch) -> None:
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a saved latent was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, no_unpickling)
    loaded = LatentModel.from_pretrained(saved, backbone=in_memory)
    monkeypatch.undo()
    assert type(loaded) is LatentModel and loaded.backbone is in_memory and not loaded.training
    assert list(loaded.state_dict()) == list(trained.state_dict())
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)
    assert loaded.settings == trained.settings and loaded.template == DEFAULT_TEMPLATE
    expected = records(Scorer(trained, template=DEFAULT_TEMPLATE, quiet=True, **SCORING))
    assert records(Scorer(loaded, template=DEFAULT_TEMPLATE, quiet=True, **SCORING)) == expected
    # scoring straight from the folder applies the template it records
    assert records(Scorer.from_pretrained(saved, backbone=in_memory, quiet=True, **SCORING)) == expected
    assert records(Scorer.from_checkpoint(saved, backbone=in_memory, quiet=True, **SCORING)) == expected
    # and the LightningModule, to train on from there
    again = LatentLM.from_model(LatentModel.from_pretrained(saved, backbone=in_memory))
    assert type(again) is LatentLM and type(again.model) is LatentModel and again.model.settings == trained.settings
    assert {k: again.hparams[k] for k in trained.settings} == trained.settings  # its training settings are the saved ones
    # saved again, the folder is the same
    resaved = loaded.save_pretrained(saved.parent / "again")
    assert (resaved / "config.json").read_text() == (saved / "config.json").read_text()
    assert (resaved / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()


def test_non_finite_weights_are_not_saved(in_memory, tmp_path) -> None:
    latent = LatentModel(in_memory, d_z=4, hidden=16)
    with torch.no_grad():
        latent.latent.proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in latent.proj.weight"):
        latent.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_a_latent_of_a_model_in_memory_asks_for_it(saved, fit, model_folder, tiny_gpt2) -> None:
    """Neither the folder nor a training checkpoint can load its model by name: they ask for it."""
    ckpt = fit[1]
    assert checkpoint.read(ckpt)["vtrans"]["backbone"]["source"] == "memory"
    tries = [(load, saved) for load in (LatentModel.from_pretrained, checkpoint.load, Scorer.from_pretrained)]
    tries += [(checkpoint.load, ckpt), (Scorer.from_checkpoint, ckpt)]
    for load, path in tries:
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert "'my-gpt2'" in message and "backbone=Backbone.from_model(model, tokenizer)" in message
        assert str(path) in message and "\n" not in message
    with pytest.raises(CheckpointError, match="is a file, not a folder written by save_pretrained"):
        LatentModel.from_pretrained(ckpt)
    # the user's model loaded again, in another process say, fits; so does the same weights loaded by name
    again = Backbone.from_model(*user_model(model_folder))
    for backbone in (again, tiny_gpt2):
        assert checkpoint.load(ckpt, backbone=backbone).backbone is backbone
        assert LatentModel.from_pretrained(saved, backbone=backbone).backbone is backbone


def test_a_folder_of_another_base_model_is_refused_naming_both(saved, in_memory, tiny_llama) -> None:
    for load in (LatentModel.from_pretrained, Scorer.from_pretrained):
        with pytest.raises(CheckpointError) as info:
            load(saved, backbone=tiny_llama)
        message = str(info.value)
        assert "'my-gpt2'" in message and "'tiny-llama'" in message
        assert in_memory.fingerprint() in message and tiny_llama.fingerprint() in message


def _rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


DAMAGE = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "it has no config.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "it has no model.safetensors"),
    "empty config.json": (lambda f: (f / "config.json").write_text(""), "config.json is not valid JSON"),
    "garbled config.json": (lambda f: (f / "config.json").write_text('{"format": "vtrans-'), "config.json is not valid JSON"),
    "a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "is not the config of a vtrans latent"),
    "a model's config": (lambda f: (f / "config.json").write_text('{"model_type": "gpt2"}'), "is not the config of a vtrans latent"),
    "a later version": (lambda f: _rewrite_config(f, lambda c: c.update(format_version=2)), "format version 2"),
    "no fingerprint": (lambda f: _rewrite_config(f, lambda c: c.pop("fingerprint")), "is damaged"),
    "a spec not a dict": (lambda f: _rewrite_config(f, lambda c: c.update(backbone="gpt2")), "is damaged"),
    "an unknown setting": (
        lambda f: _rewrite_config(f, lambda c: c["settings"].update(no_such_setting=1)),
        "holds latent settings this version cannot build: unknown setting(s) no_such_setting",
    ),
    "a setting out of range": (lambda f: _rewrite_config(f, lambda c: c["settings"].update(d_z=-3)), "d_z must be >= 1"),
    "garbled weights": (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), "is not readable safetensors"),
    "weights of another shape": (
        lambda f: save_file({**load_file(f / "model.safetensors"), "latent.proj.weight": torch.ones(2, 2)}, f / "model.safetensors"),
        "does not fit this latent",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_folder_is_refused_in_one_line(saved, in_memory, tmp_path, damage) -> None:
    folder = tmp_path / "latent"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((saved / name).read_bytes())
    change, message = DAMAGE[damage]
    change(folder)
    for load in (LatentModel.from_pretrained, checkpoint.load, Scorer.from_pretrained):
        with pytest.raises(CheckpointError) as info:
            load(folder, backbone=in_memory)
        assert message in str(info.value) and str(folder) in str(info.value) and "\n" not in str(info.value)


def test_a_folder_of_a_model_named_scores_from_the_command_line(tiny_ckpt, tiny_gpt2, tmp_path, capsys) -> None:
    """A training checkpoint converted to a folder: by name it needs nothing but the folder."""
    folder = checkpoint.load(tiny_ckpt).save_pretrained(tmp_path / "tiny-latent")
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone"] == tiny_gpt2.spec and config["template"] == checkpoint.template_in(checkpoint.read(tiny_ckpt))
    args = ["--quiet", "--device", "cpu", "--estimators", "msp,latent_nll", "--samples", "2", *PROMPTS]
    main(["score", "--ckpt", str(folder), *args])
    from_folder = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    main(["score", "--ckpt", str(tiny_ckpt), *args])
    assert from_folder == [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(from_folder) == 3 and all(r["template"] == config["template"] for r in from_folder)


# --------------------------------------------------------------------------- Scorer and evaluate from a model in memory


# A model in memory runs the attention implementation it was loaded with; transformers' default,
# sdpa, sums in another order than the eager attention a backbone loaded by name runs, which moves
# scores in their last bits. Loaded with eager attention, it must give the very same scores.


def test_a_scorer_on_a_model_in_memory_scores_as_one_built_by_name(tiny_ckpt, model_folder) -> None:
    by_name = records(Scorer.from_checkpoint(tiny_ckpt, device="cpu", quiet=True, **SCORING))
    backbone = Backbone.from_model(*user_model(model_folder, attn_implementation="eager"))
    scorer = Scorer.from_checkpoint(tiny_ckpt, backbone=backbone, quiet=True, **SCORING)
    assert scorer.module.backbone is backbone and scorer.module.device == backbone.device
    assert records(scorer) == by_name
    assert len(by_name) == 3 and all(set(r["scores"]) == set(SCORING["estimators"]) for r in by_name)


def test_evaluate_with_a_model_in_memory(saved, model_folder, tiny_gpt2, tmp_path) -> None:
    in_memory = Backbone.from_model(*user_model(model_folder, attn_implementation="eager"), name="my-gpt2")
    config = EvalConfig(data="builtin:test", max_items=6, estimators=["msp", "latent_nll"], samples=2, n_boot=100, batch_size=3)
    results = evaluate(config, tmp_path / "memory", ckpt=str(saved), backbone=in_memory, progress=False)
    assert results["model"] == "my-gpt2" and set(results["estimators"]) == {"msp", "latent_nll"}
    # the same weights by name, passed the same way: the same scores
    evaluate(config, tmp_path / "named", ckpt=str(saved), backbone=tiny_gpt2, progress=False)
    rows = [(tmp_path / run / "scores.jsonl").read_text().splitlines() for run in ("memory", "named")]
    assert rows[0] == rows[1] and len(rows[0]) == 6
    without_latent = evaluate(replace(config, estimators=["msp"]), tmp_path / "bare", backbone=in_memory, progress=False)
    assert without_latent["model"] == "my-gpt2"
    with pytest.raises(ConfigError, match="not both"):
        evaluate(config, tmp_path / "both", model="tiny-gpt2", backbone=in_memory, progress=False)


# --------------------------------------------------------------------------- the package root


def test_the_public_api_is_importable_from_the_package_root() -> None:
    code = (
        "import sys, vtrans\n"
        "assert 'torch' not in sys.modules, 'import vtrans imported torch'\n"
        "from vtrans import Scorer, Backbone, LatentModel\n"
        "import vtrans.scoring.scorer, vtrans.backbone.loading, vtrans.latent.model\n"
        "assert (Scorer, Backbone, LatentModel) == (vtrans.scoring.scorer.Scorer, vtrans.backbone.loading.Backbone, vtrans.latent.model.LatentModel)\n"
        "assert {'Scorer', 'Backbone', 'LatentModel'} <= set(vtrans.__all__)\n"
        "assert callable(Backbone.from_model) and callable(LatentModel.from_pretrained) and callable(Scorer.from_pretrained)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
