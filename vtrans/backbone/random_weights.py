"""Models with random weights, built from a config: the tiny ones of the tests and ``random:NAME``.

* ``tiny-gpt2``, ``tiny-llama``, ... (:data:`TINY`, one per supported family): small random models
  built offline with the GPT-2 tokenizer, for tests;
* ``random:NAME`` (``random:NAME@SEED``): the architecture of a model known by name
  (:data:`RANDOM_CONFIGS`, the tiny ones, and the embedded ``smollm2`` / ``gemma3-270m`` from
  their cache) with random weights drawn from ``SEED`` (default 0) and the model's real tokenizer:
  for measuring what a full-size model costs, never what it knows (``Backbone.random_weights``).
"""

from __future__ import annotations

import torch

from vtrans.backbone.architectures import architecture_of_type
from vtrans.backbone.embedded import EMBEDDED
from vtrans.backbone.files import gpt2_tokenizer
from vtrans.errors import BackboneError

RANDOM = "random:"  # the prefix of a model name whose weights are random (RANDOM_CONFIGS)
RANDOM_WEIGHTS = "random weights"  # what every output of a run on such a model says
GPT2_SIZES = {  # (n_layer, n_embd, n_head) of OpenAI's GPT-2 releases
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
RANDOM_CONFIGS = {
    name: dict(model_type="gpt2", n_layer=n, n_embd=d, n_head=h, n_positions=1024, vocab_size=50257)
    for name, (n, d, h) in GPT2_SIZES.items()
}
"""The configs ``random:NAME`` builds, written here (GPT-2's are public numbers); besides these, the
tiny ones (:data:`TINY`) and the embedded models, whose config and tokenizer their cache holds."""
_TINY_ROTARY = dict(  # what the tiny rotary models share: 4 blocks, d = 64, 4 heads of 16, 2 key/value heads
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=128,
    vocab_size=50257,
)
TINY = {
    "tiny-gpt2": dict(model_type="gpt2", n_layer=4, n_head=4, n_embd=64, n_positions=128, vocab_size=50257),
    "tiny-llama": dict(_TINY_ROTARY, model_type="llama", tie_word_embeddings=True, rms_norm_eps=1e-5),
    # a window shorter than the test prompts, so that the sliding-window masks are exercised
    "tiny-mistral": dict(_TINY_ROTARY, model_type="mistral", sliding_window=4),
    "tiny-qwen2": dict(_TINY_ROTARY, model_type="qwen2"),
    "tiny-qwen3": dict(_TINY_ROTARY, model_type="qwen3", head_dim=16),
    "tiny-phi3": dict(_TINY_ROTARY, model_type="phi3", pad_token_id=50256),
    # Gemma: sliding and full blocks alternate; head_dim and query_pre_attn_scalar are 256 by default
    "tiny-gemma2": dict(
        _TINY_ROTARY,
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        final_logit_softcapping=2.0,  # small enough to bend a random model's logits
        pad_token_id=50256,
    ),
    "tiny-gemma3": dict(
        _TINY_ROTARY,
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        pad_token_id=50256,
    ),
    "tiny-gpt-neox": dict(
        model_type="gpt_neox",
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=128,
        vocab_size=50257,
    ),
}
"""Small random models, one per family in ``vtrans.backbone.architectures.ARCHITECTURES`` (``tiny-`` and its name, ``_`` as ``-``), for tests."""


def load_tiny(name: str, dtype: torch.dtype, attn: str, seed: int = 0):
    """A small random model of one family (:data:`TINY`), built offline with the GPT-2 tokenizer."""
    return _from_config(_config(TINY[name]), name, dtype, attn, seed), gpt2_tokenizer()


def _config(settings: dict):
    from transformers import AutoConfig

    kw = dict(settings)
    return AutoConfig.for_model(kw.pop("model_type"), bos_token_id=50256, eos_token_id=50256, **kw)


def _from_config(config, name: str, dtype: torch.dtype, attn: str, seed: int):
    """The model ``config`` describes, its weights drawn from ``seed`` (the global random state left as it was)."""
    from transformers import AutoModelForCausalLM

    architecture_of_type(config.model_type)  # an unsupported architecture fails before its weights are drawn
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config._name_or_path = name
    return model


def random_names() -> list[str]:
    """Every model ``random:NAME`` can build."""
    return [*RANDOM_CONFIGS, *EMBEDDED, *TINY]


def load_random(name: str, dtype: torch.dtype, attn: str):
    """``random:NAME[@SEED]``: NAME's architecture with weights drawn from SEED (default 0), and NAME's own tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    base, _, seed = name.removeprefix(RANDOM).partition("@")
    if base not in random_names():
        raise BackboneError(f"unknown model {name!r}: random: builds {', '.join(RANDOM + n for n in random_names())}")
    if seed and not seed.isdigit():
        raise BackboneError(f"{name!r}: the seed after '@' must be a non-negative integer, got {seed!r}")
    if base in EMBEDDED:  # its config and tokenizer are the real ones, from the cache its first use writes
        folder = EMBEDDED[base](attn)
        config, tokenizer = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    else:
        config, tokenizer = _config(RANDOM_CONFIGS.get(base) or TINY[base]), gpt2_tokenizer()
    return _from_config(config, name, dtype, attn, int(seed or 0)), tokenizer
