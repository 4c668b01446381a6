"""The one place that knows architectures: tiny models, their parts, block surgery, loading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vtrans.backbone import architectures, tokens
from vtrans.backbone.loading import Backbone
from vtrans.errors import BackboneError

PROMPTS = ["Complete the idiom: a piece of", "Hi", "Complete the idiom: once in a blue"]
TARGETS = ["cake", "there friend", "moon"]


def encoded(backbone: Backbone) -> tokens.Encoded:
    """Three items of different lengths, left-padded (the middle one mostly padding)."""
    enc = tokens.encode(backbone.tokenizer, PROMPTS, tokens.target_ids(backbone.tokenizer, TARGETS))
    assert (enc.attention_mask == 0).any(), "the batch must exercise left padding"
    return enc


@torch.no_grad()
def full_logits(model: nn.Module, enc: tokens.Encoded) -> torch.Tensor:
    return model(
        input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids, use_cache=False
    ).logits  # (B, T, V)


# --------------------------------------------------------------------------- tiny models


def test_tiny_gpt2_is_tiny(tiny_gpt2):
    model = tiny_gpt2.model
    assert model.config.model_type == "gpt2"
    assert model.config.n_layer == 4 and model.config.n_embd == 64
    assert tiny_gpt2.family == "gpt2" and architectures.family(model) == "gpt2"
    assert tiny_gpt2.n_layers == 4 and tiny_gpt2.d_model == 64
    assert architectures.trunk(model) is model.transformer
    assert architectures.blocks(model) is model.transformer.h and len(model.transformer.h) == 4
    assert architectures.final_norm(model) is model.transformer.ln_f
    assert architectures.unembedding(model) is model.lm_head
    assert sum(p.numel() for p in model.parameters()) < 5_000_000  # not a 124M GPT-2 by accident


def test_tiny_llama_is_tiny(tiny_llama):
    model = tiny_llama.model
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    assert tiny_llama.family == "llama" and architectures.family(model) == "llama"
    assert tiny_llama.n_layers == 4 and tiny_llama.d_model == 64
    assert architectures.trunk(model) is model.model
    assert architectures.blocks(model) is model.model.layers and len(model.model.layers) == 4
    assert architectures.final_norm(model) is model.model.norm
    assert architectures.unembedding(model) is model.lm_head
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_backbone_is_frozen_and_stays_in_eval(tiny_backbone):
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not tiny_backbone.training and not tiny_backbone.model.training


def test_lens_logits_at_the_last_layer_are_the_models_logits(tiny_backbone):
    model = tiny_backbone.model
    enc = encoded(tiny_backbone)
    with torch.no_grad():
        out = model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=enc.position_ids,
            output_hidden_states=True,
        )
        raw_last = _raw_stream(model, enc, tiny_backbone.n_layers)
        lens = architectures.lens_logits(model, raw_last)
    torch.testing.assert_close(lens, out.logits, atol=1e-5, rtol=0)


def test_block_output_normalises_tuple_and_tensor(tiny_gpt2):
    h = torch.randn(2, 3, 64)
    assert architectures.block_output(h) is h
    assert architectures.block_output((h, None)) is h
    assert architectures.block_output((h, torch.zeros(1), torch.ones(1))) is h
    # whatever the installed transformers returns from a real block, the helper yields (B, T, C)
    block = architectures.blocks(tiny_gpt2.model)[0]
    with torch.no_grad():
        out = architectures.block_output(block(h))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 64)


def test_unknown_architecture_fails_loudly():
    fake = SimpleNamespace(config=SimpleNamespace(model_type="bert"))
    for ask in (architectures.family, architectures.blocks, architectures.final_norm, architectures.trunk):
        with pytest.raises(BackboneError, match="unsupported architecture 'bert'"):
            ask(fake)
    with pytest.raises(BackboneError, match="unsupported architecture None"):
        architectures.family(nn.Linear(2, 2))


def test_unknown_architecture_in_a_folder_fails_before_loading(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="unsupported architecture 'bert'"):
        Backbone(str(tmp_path))


def test_folder_without_weights_is_a_backbone_error(tmp_path, tiny_gpt2):
    tiny_gpt2.model.config.to_json_file(tmp_path / "config.json")  # config.json only, no weights
    with pytest.raises(BackboneError, match=str(tmp_path)):
        Backbone(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="config.json"):
        Backbone(str(tmp_path))


def test_bad_dtype_is_a_backbone_error():
    with pytest.raises(BackboneError, match="dtype must be one of"):
        Backbone("tiny-gpt2", dtype="float8")


# --------------------------------------------------------------------------- block surgery


def _raw_stream(model: nn.Module, enc: tokens.Encoded, stop: int) -> torch.Tensor:
    with architectures.blocks_until(model, stop) as body:
        return body(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids, use_cache=False
        ).last_hidden_state  # (B, T, C)


def _parts(model: nn.Module) -> dict[str, object]:
    """Identity of every module the surgery touches."""
    body = architectures.trunk(model)
    parts = {
        "blocks": architectures.blocks(model),
        "block_ids": [id(b) for b in architectures.blocks(model)],
        "norm": architectures.final_norm(model),
        "lm_head": architectures.unembedding(model),
    }
    if architectures.family(model) == "gpt2":
        parts["wpe"] = body.wpe
    return parts


@pytest.mark.parametrize("k", [1, 2, 3])
@torch.no_grad()
def test_blocks_until_and_from_reproduce_the_full_model(tiny_backbone, k):
    model = tiny_backbone.model
    enc = encoded(tiny_backbone)
    before = _parts(model)
    reference = model(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        position_ids=enc.position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    h = _raw_stream(model, enc, k)
    torch.testing.assert_close(h, reference.hidden_states[k], atol=1e-5, rtol=0)
    with architectures.blocks_from(model, k) as upper:
        assert len(architectures.blocks(model)) == tiny_backbone.n_layers - k
        logits = upper(
            inputs_embeds=h, attention_mask=enc.attention_mask, position_ids=enc.position_ids, use_cache=False
        ).logits
    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=0)
    assert _parts(model) == before


@pytest.mark.parametrize("context", [architectures.blocks_until, architectures.blocks_from])
def test_surgery_is_undone_when_the_body_raises(tiny_backbone, context):
    model = tiny_backbone.model
    before = _parts(model)
    with pytest.raises(RuntimeError, match="inside"), context(model, 2):
        assert len(architectures.blocks(model)) == 2  # the swap is in place here
        raise RuntimeError("inside the context")
    assert _parts(model) == before
    assert len(architectures.blocks(model)) == tiny_backbone.n_layers
    if tiny_backbone.family == "gpt2":
        assert isinstance(model.transformer.wpe, nn.Embedding)
    enc = encoded(tiny_backbone)
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
    assert len(out.hidden_states) == tiny_backbone.n_layers + 1


def test_attention_implementation_switches_for_the_block_and_back(tiny_backbone):
    model = tiny_backbone.model
    assert model.config._attn_implementation == "eager"
    enc = encoded(tiny_backbone)
    with architectures.attention_implementation(model, "sdpa") as m:
        assert m is model and model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            sdpa = full_logits(model, enc)
    assert model.config._attn_implementation == "eager"
    real = enc.attention_mask.bool()  # padded positions attend to nothing: each implementation fills them its own way
    torch.testing.assert_close(sdpa[real], full_logits(model, enc)[real], atol=1e-5, rtol=0)  # the same model
    with architectures.attention_implementation(model, None):
        assert model.config._attn_implementation == "eager"  # None leaves it as it is
    with pytest.raises(RuntimeError, match="inside"), architectures.attention_implementation(model, "sdpa"):
        raise RuntimeError("inside the context")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == tiny_backbone.n_layers  # eager again: weights


# --------------------------------------------------------------------------- loading


def test_gpt2_folder_without_tokenizer_gets_the_real_gpt2_bpe(tmp_path, tiny_gpt2):
    folder = tmp_path / "my-gpt2"
    original = Backbone("tiny-gpt2")  # save_pretrained edits the config it saves: not the shared one
    fingerprint = original.fingerprint()
    original.model.save_pretrained(folder)
    assert original.fingerprint() == fingerprint  # saving is not a different model
    assert not any(folder.glob("*token*")) and not (folder / "vocab.json").exists()
    loaded = Backbone(name=str(folder))
    assert loaded.family == "gpt2" and loaded.n_layers == 4
    assert loaded.tokenizer("Complete")["input_ids"] == [20988]
    assert loaded.tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id == 50256
    assert loaded.fingerprint() == fingerprint == tiny_gpt2.fingerprint()  # a tiny-gpt2 checkpoint fits it
    enc = encoded(tiny_gpt2)
    torch.testing.assert_close(full_logits(loaded.model, enc), full_logits(tiny_gpt2.model, enc), atol=0, rtol=0)


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(BackboneError, match="unknown model or missing folder") as err:
        Backbone(name=str(tmp_path / "not-there"))
    assert "save_pretrained" in str(err.value)


def test_gpt2_xl_not_in_the_cache_says_how_to_provide_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads the environment once, at import: point its constants there too
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    with pytest.raises(BackboneError) as err:
        Backbone(name="gpt2-xl")
    message = str(err.value)
    assert "openai-community/gpt2-xl" in message and "not available offline" in message
    assert "HF_HOME" in message and "save_pretrained" in message
    assert "\n" not in message  # one line for the command line
    assert not any(home.rglob("*.safetensors"))  # nothing was fetched


def test_tiny_models_are_deterministic():
    a, b = Backbone("tiny-llama"), Backbone("tiny-llama")
    assert a.fingerprint() == b.fingerprint()
    assert json.dumps(a.spec) == json.dumps({"name": "tiny-llama", "dtype": "float32", "attn_implementation": "eager"})
