"""Every family in ``vtrans.backbone.architectures.ARCHITECTURES``, each on its tiny random model (``vtrans.backbone.random_weights.TINY``).

Each family's tiny model (4 blocks, d = 64, the GPT-2 tokenizer's vocabulary, random weights,
built offline) is run through what vtrans does with a backbone: the table's parts, the logit
lens against the model's own logits, the block surgery and the frozen prefix against the whole
forward, a latent trained a few steps, every estimator that needs no labels, and ``Scorer``.
Sliding-window families (Mistral, Gemma 2 and 3) get a window of 4 positions, shorter than the
prompts, so that their masks are exercised; Gemma 2's soft-cap is 2, small enough to bend a
random model's logits (of size ~1), so that leaving it out fails.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from vtrans.backbone import architectures, attention, tokens
from vtrans.backbone.frozen import FrozenCache
from vtrans.backbone.loading import Backbone
from vtrans.backbone.random_weights import TINY
from vtrans.config import EstimatorConfig
from vtrans.errors import BackboneError
from vtrans.estimators import lens
from vtrans.estimators.base import run_forward
from vtrans.estimators.latent import sample_logits
from vtrans.estimators.registry import SCORABLE
from vtrans.estimators.runner import Runner
from vtrans.latent.datamodule import IdiomDataModule
from vtrans.latent.laplace import fit as fit_laplace
from vtrans.latent.model import LatentModel
from vtrans.latent.module import LatentLM
from vtrans.latent.refit import fit as fit_refit
from vtrans.scoring.scorer import Scorer

FAMILIES = [arch.name for arch in architectures.ARCHITECTURES]
PROMPTS = ["Complete the idiom: a piece of", "Hi", "Complete the idiom: once in a blue"]
TARGETS = ["cake", "there friend", "moon"]
# Logits of size ~1 (random tiny models) computed in float32 by the same operations in another
# grouping (a sliced stack of blocks, a cached prefix, the lens's blockwise log-partition) differ
# by a few ulp, ~1e-7; 1e-5 leaves a hundredfold margin and still catches any real difference
# (a missing soft-cap moves Gemma 2's logits by ~1e-2, a wrong mask or position by ~1e-1).
ATOL = 1e-5


def tiny_name(family: str) -> str:
    return "tiny-" + family.replace("_", "-")


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request) -> Backbone:
    return Backbone(tiny_name(request.param))


def encoded(backbone: Backbone) -> tokens.Encoded:
    """Three items of different lengths, left-padded, each longer than a tiny sliding window but one."""
    enc = tokens.encode(backbone.tokenizer, PROMPTS, tokens.target_ids(backbone.tokenizer, TARGETS))
    assert (enc.attention_mask == 0).any(), "the batch must exercise left padding"
    return enc


@torch.no_grad()
def whole(model: nn.Module, enc: tokens.Encoded):
    return model(**enc.inputs, output_hidden_states=True, use_cache=False)


def real(x: torch.Tensor, enc: tokens.Encoded) -> torch.Tensor:
    """The rows of x (B, T, ...) at real tokens: padded positions attend to nothing, and each path fills them its own way."""
    return x[enc.attention_mask.bool()]


# --------------------------------------------------------------------------- the table


def test_every_family_has_a_tiny_model_and_every_model_type_one_family():
    assert sorted(TINY) == sorted(tiny_name(f) for f in FAMILIES)
    types = [t for arch in architectures.ARCHITECTURES for t in arch.model_types]
    assert len(types) == len(set(types)) and len(FAMILIES) == len(set(FAMILIES))
    assert {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_neox", "phi3"} <= set(types)


def test_the_tables_parts_are_the_models(backbone):
    model, arch = backbone.model, architectures.architecture(backbone.model)
    assert model.config.model_type in arch.model_types and backbone.family == arch.name
    assert backbone.n_layers == 4 and backbone.d_model == 64 and model.config.num_hidden_layers == 4  # tiny, not a full model
    assert sum(p.numel() for p in model.parameters()) < 8_000_000  # the vocabulary's 50257 × 64, once or twice
    body = architectures.trunk(model)
    assert isinstance(architectures.blocks(model), nn.ModuleList) and len(architectures.blocks(model)) == 4
    assert architectures.final_norm(model) in set(body.children())
    assert architectures.unembedding(model).weight.shape == (model.config.vocab_size, 64)
    assert len(architectures.residual_branches(model)) == 2 * 4  # attention and MLP branch of every block
    block_modules = {id(m) for block in architectures.blocks(model) for m in block.modules()}
    for part in architectures.attention_modules(model) + architectures.mlp_modules(model) + architectures.native_dropout(model):
        assert id(part) in block_modules or part is architectures.embedding_dropout(model)
    assert len(attention.layer_types(model)) == 4


def test_an_unknown_family_is_refused_in_one_line_naming_the_supported_ones():
    for model_type in ("bert", None):
        with pytest.raises(BackboneError) as caught:
            architectures.architecture_of_type(model_type)
        message = str(caught.value)
        assert "\n" not in message and f"unsupported architecture {model_type!r}" in message
        assert all(t in message for arch in architectures.ARCHITECTURES for t in arch.model_types)
    fake = nn.Linear(2, 2)
    fake.config = type("Config", (), {"model_type": "gemma3"})()  # the multimodal Gemma 3 is not the text model
    for ask in (architectures.family, architectures.blocks, architectures.final_norm, architectures.trunk, architectures.lens_logits):
        with pytest.raises(BackboneError, match="unsupported architecture 'gemma3'"):
            ask(fake) if ask is not architectures.lens_logits else ask(fake, torch.zeros(2))


# --------------------------------------------------------------------------- the lens


def test_the_last_layer_lens_is_the_models_logits(backbone):
    model, enc = backbone.model, encoded(backbone)
    out = whole(model, enc)
    with torch.no_grad():
        with architectures.blocks_until(model, backbone.n_layers) as body:
            raw = body(**enc.inputs, use_cache=False).last_hidden_state  # (B, T, C): the stream before the final norm
        lensed = architectures.lens_logits(model, raw)
    assert_close(real(lensed, enc), real(out.logits, enc), atol=ATOL, rtol=0)
    # the lens estimator's own path (the blockwise log-partition, the chosen logit alone), given the
    # raw last stream as one more layer: it norms every layer but the last (Hugging Face's, normed already)
    states = (*out.hidden_states[:-1], raw, out.hidden_states[-1])
    traj = lens.trajectory(model, states, enc, enc.targets)  # (B, L+2, N)
    logp = torch.log_softmax(tokens.slot_positions(out.logits, enc).float(), -1)
    expected = -logp.gather(-1, enc.targets.unsqueeze(-1)).squeeze(-1)  # (B, N): −log p(target) of the model
    for layer in (-2, -1):
        assert_close(traj[:, layer][enc.target_mask], expected[enc.target_mask], atol=ATOL, rtol=0)
    cap = architectures.logit_softcap(model)
    if cap is not None:  # the cap matters: without it the lens is not the model
        uncapped = architectures.unembedding(model)(architectures.final_norm(model)(raw))
        assert (real(uncapped - out.logits, enc)).abs().max() > 1e-3


def test_layer_zero_is_the_embedding_as_block_zero_sees_it(backbone):
    """The lens at layer 0 decodes hidden_states[0]: the token embedding scaled (Gemma: √d, inside
    the embedding module) plus a learned position embedding (GPT-2)."""
    model, enc = backbone.model, encoded(backbone)
    embedding = model.get_input_embeddings()
    scale = architectures.embedding_scale(model)
    assert scale == (8.0 if backbone.family.startswith("gemma") else 1.0)  # √64
    with torch.no_grad():
        h0 = embedding.weight[enc.input_ids] * scale
        positions = architectures.position_embedding(model)
        if positions is not None:
            h0 = h0 + positions(enc.position_ids)
    assert_close(real(h0, enc), real(whole(model, enc).hidden_states[0], enc), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- block surgery, the frozen prefix


@torch.no_grad()
def test_some_blocks_and_the_frozen_prefix_reproduce_the_whole_model(backbone):
    model, enc = backbone.model, encoded(backbone)
    window = getattr(model.config, "sliding_window", None)
    if "sliding_attention" in attention.layer_types(model):
        assert int(enc.attention_mask.sum(1).max()) > window  # the window cuts: the masks are tested
    out = whole(model, enc)
    for k in (1, 2, 3):
        with architectures.blocks_until(model, k) as body:
            h = body(**enc.inputs, use_cache=False).last_hidden_state
        assert_close(real(h, enc), real(out.hidden_states[k], enc), atol=ATOL, rtol=0)
        with architectures.blocks_from(model, k) as upper:
            assert len(architectures.blocks(model)) == 4 - k
            logits = upper(
                inputs_embeds=h, attention_mask=enc.attention_mask, position_ids=enc.position_ids, use_cache=False
            ).logits
        assert_close(real(logits, enc), real(out.logits, enc), atol=ATOL, rtol=0)
    assert len(architectures.blocks(model)) == 4 and len(attention.layer_types(model)) == 4  # put back
    # an untrained latent leaves the logits as they were, through the frozen cache's two-region layout
    # (prefix and suffix regions each left-padded: columns are not positions there)
    module = LatentModel(backbone, d_z=4, hidden=16).eval()
    targets = module.target_ids(TARGETS)
    cache_enc, h, prefix = FrozenCache().batch(module.backbone, module.layer, PROMPTS, targets)
    z = torch.randn(len(PROMPTS), 3, 4, generator=torch.Generator().manual_seed(0)) * 3  # (B, S, d_z)
    logits = module.decode(h, z[:, 0], cache_enc, prefix)  # (B, N, V)
    base = tokens.slot_positions(model(**enc.inputs).logits, enc)  # (B, N, V)
    assert_close(logits[cache_enc.target_mask], base[enc.target_mask], atol=ATOL, rtol=0)
    # once z reaches the stream, the z samples (the scored position alone, on the shared forward's keys
    # and values, a mask of their own) give the training decoder's logits
    module.latent.proj.weight.copy_(torch.randn(module.latent.proj.weight.shape, generator=torch.Generator().manual_seed(1)))
    forward = run_forward(model, enc, hidden_states=True, cache=True)
    h = forward.hidden_states[module.layer]
    samples = sample_logits(module, h, enc, forward.cache, z, rows_per_chunk=6)  # (B, S, V), 2 items a chunk
    rows = torch.arange(len(PROMPTS))
    decoded = torch.stack([module.decode(h, z[:, s], enc)[rows, enc.first_slot] for s in range(3)], 1)
    assert (decoded[:, 0] - decoded[:, 1]).abs().max() > 1e-3  # z moves the logits: a real check
    assert_close(samples, decoded.float(), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- training, estimators, scoring


@pytest.fixture(scope="module")
def trained(backbone, tmp_path_factory) -> LatentModel:
    """A conditional-prior latent after two training steps."""
    with torch.random.fork_rng():
        L.seed_everything(0, verbose=False)
        module = LatentLM(backbone, d_z=4, hidden=16, prior="conditional", lr=1e-2)
        before = module.model.latent.proj.weight.detach().clone()
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path_factory.mktemp("fit"),
        )
        trainer.fit(module, IdiomDataModule(batch_size=4, max_items=8))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(module.model.latent.proj.weight.detach(), before)  # it trained
    return module.model.eval()


@pytest.fixture(scope="module")
def posteriors(trained) -> dict:
    """A Laplace posterior over the trained latent's prior network, and its prior's spread refit."""
    return {
        "laplace": fit_laplace(trained, PROMPTS),
        "refit": fit_refit(trained, PROMPTS, ["cake", "there", "moon"]),  # the held-out idioms' targets
    }


def test_every_estimator_without_labels_scores_the_trained_latent(backbone, trained, posteriors):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        member = LatentModel(backbone, d_z=4, hidden=16, prior="conditional").eval()  # a second, untrained member
    config = EstimatorConfig(batch_size=2, passes=2, samples=3, agreement_samples=2, max_new_tokens=3)
    runner = Runner(backbone, trained, config, progress=False, members=(trained, member), posteriors=posteriors)
    names = runner.runnable(SCORABLE)
    assert names == list(SCORABLE)  # every one applies: a latent, the conditional prior, an ensemble, a Laplace posterior, a refit spread
    completions = runner.complete(PROMPTS)
    scores = runner.scores(PROMPTS, completions, names)
    for name in names:
        assert scores[name].shape == (len(PROMPTS),) and torch.isfinite(scores[name]).all(), name
    assert (scores["mc_dropout_var"] > 0).all()  # the dropout, the family's own or inserted, is on
    # scoring bare prompts reads what generate kept (one pass): the same completions and scores
    one_pass_completions, one_pass = runner.score_prompts(PROMPTS, names)
    assert one_pass_completions == completions
    for name in names:  # the same sums over another layout of the same keys: rounding only, as in test_runner
        assert_close(one_pass[name], scores[name], rtol=1e-4, atol=1e-5, msg=name)


def test_scorer_scores_a_prompt(trained):
    scorer = Scorer(trained, quiet=True, batch_size=2, samples=3, max_new_tokens=3)
    (record,) = list(scorer.score(["Complete the idiom: a piece of"]))
    assert isinstance(record["completion"], str) and set(scorer.names) <= set(record["scores"])
    assert all(record["scores"][name] is not None for name in scorer.names), record  # null marks a non-finite score
