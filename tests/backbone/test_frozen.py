"""``vtrans.backbone.frozen`` and every other caller of transformers' cache: the current API, the same numbers.

transformers names the keys and values of a forward ``cache`` (argument and output); the old
name ``past_key_values`` still works, with a ``FutureWarning`` (argument) or a logged
deprecation (output), until it is removed. Here both are errors.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from vtrans.backbone import architectures
from vtrans.backbone.frozen import upper_prefix, upper_suffix
from vtrans.backbone.generate import generate_batch
from vtrans.estimators.registry import SCORABLE, why_not
from vtrans.latent.model import LatentModel
from vtrans.latent.module import LatentLM
from vtrans.scoring.scorer import Scorer

PROMPTS = ["Complete the idiom: a piece of", "once in a", "kick the"]


@contextlib.contextmanager
def no_deprecated_cache_api(monkeypatch):
    """Fail on a ``FutureWarning`` or on transformers' once-only deprecation log (its cache bypassed)."""
    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *args, **kwargs: logged.append(str(msg)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield
    assert not [m for m in logged if "deprecated" in m], logged


def test_a_suffix_over_a_frozen_prefix_equals_the_whole_forward(tiny_backbone, monkeypatch):
    model, layer = tiny_backbone.model, 2
    latent = LatentModel(tiny_backbone, layer=layer, d_z=4, hidden=8)
    enc = latent.encode(PROMPTS[:1])
    split = enc.input_ids.shape[1] - 2
    with no_deprecated_cache_api(monkeypatch), torch.no_grad():
        h = latent.lower(enc)  # (1, T, C)
        prefix = upper_prefix(model, layer, h, enc.attention_mask, enc.position_ids, split)
        logits = upper_suffix(model, layer, h[:, split:], enc.attention_mask, enc.position_ids, prefix)
        whole = model(**enc.inputs).logits  # (1, T, V)
    assert prefix.length == split and len(prefix.kv) == architectures.n_layers(model) - layer
    # the same float32 sums in another order: an absolute error of a few ulp of logits of size ~1
    torch.testing.assert_close(logits, whole[:, split:], atol=1e-5, rtol=1e-5)


def test_generation_keeps_its_cache_and_feeds_the_last_token(tiny_gpt2, monkeypatch):
    with no_deprecated_cache_api(monkeypatch):
        _, generation = generate_batch(tiny_gpt2.model, tiny_gpt2.tokenizer, PROMPTS, max_new_tokens=3, cache=True)
        fed = generation.fed
        generation.feed_last(tiny_gpt2.model)
    assert generation.cache.get_seq_length() == fed + 1 == generation.fed


def test_scoring_and_training_use_the_current_cache_api(tiny_ckpt, monkeypatch):
    # every estimator a checkpoint of one conditional latent can score (no ensemble, no fitted posterior)
    names = [n for n in SCORABLE if why_not(n, "conditional") is None]
    with no_deprecated_cache_api(monkeypatch):
        scorer = Scorer.from_checkpoint(tiny_ckpt, device="cpu", estimators=names, quiet=True)
        records = list(scorer.score(PROMPTS))
        module = LatentLM(scorer.module.backbone, d_z=4, hidden=8)
        batch = {"prompt": PROMPTS[:2], "target": ["cake", "blue"]}
        for cache_frozen in (True, False):
            module.hparams.cache_frozen = cache_frozen
            module.log = module.log_dict = lambda *args, **kwargs: None
            module._shared_step(batch, "train").backward()
    assert all("error" not in r and len(r["scores"]) == len(names) for r in records)

