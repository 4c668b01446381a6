"""Options that trade memory or time must not change what is computed."""

from __future__ import annotations

import pytest
import torch

from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import encode
from vtrans.errors import ConfigError
from vtrans.estimators import mc_dropout
from vtrans.latent.module import LatentLM

PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: break the", "hello"]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def backbone(request) -> Backbone:
    return Backbone(request.param)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(backbone: Backbone) -> None:
    batch = {"prompt": PROMPTS, "target": ["cake", "ice", "fiddlesticks"]}
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        module = LatentLM(backbone, d_z=4, hidden=16, gradient_checkpointing=flag)
        torch.nn.init.normal_(module.model.latent.proj.weight, std=0.5)
        module.log = lambda *a, **k: None
        module.train()
        torch.manual_seed(1)
        loss = module._shared_step(batch, "train")
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in module.model.latent.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], msg=name)
    assert grads[0][1]["proj.weight"].abs().sum() > 0


def test_mc_dropout_from_layer(backbone: Backbone) -> None:
    model, tok = backbone.model, backbone.tokenizer
    enc = encode(tok, PROMPTS, [[262], [262], [262]])
    plain = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids).logits
    rows = torch.arange(len(PROMPTS))
    expected = plain[rows, -2]  # the scored position (one target slot)
    # p = 0: every pass through the deterministic lower half and the upper half equals the plain forward
    logits = mc_dropout.sample_logits(model, enc, passes=3, p=0.0, from_layer=2)  # (B, 3, V)
    for t in range(3):
        torch.testing.assert_close(logits[:, t], expected, atol=1e-5, rtol=1e-5)
    # p > 0 above the layer: the passes differ, so the estimator has variance
    stats = mc_dropout.scores(model, enc, passes=8, p=0.3, from_layer=2)
    assert (stats["mc_dropout_var"] > 0).all()
    # the model is back as it was
    again = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids).logits
    torch.testing.assert_close(again, plain)
    with pytest.raises(ConfigError, match="from_layer"):
        mc_dropout.sample_logits(model, enc, passes=2, p=0.1, from_layer=99)


def test_length_bucketed_batches_are_a_shuffled_partition_with_little_spread() -> None:
    from vtrans.latent.datamodule import IdiomDataModule

    plain = IdiomDataModule(batch_size=16, seed=3)
    bucketed = IdiomDataModule(batch_size=16, seed=3, length_bucketed=True)
    for dm in (plain, bucketed):
        dm.setup("fit")

    def epoch(dm, e):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(e)
        return list(loader)

    def spread(batches):
        return sum(max(map(len, b["prompt"])) - min(map(len, b["prompt"])) for b in batches) / len(batches)

    b0, b0_again, b1 = epoch(bucketed, 0), epoch(bucketed, 0), epoch(bucketed, 1)
    items = sorted(p for b in b0 for p in b["prompt"])
    assert items == sorted(p for b in epoch(plain, 0) for p in b["prompt"])  # every item once
    assert [b["prompt"] for b in b0] == [b["prompt"] for b in b0_again]  # a function of (seed, epoch)
    assert [b["prompt"] for b in b0] != [b["prompt"] for b in b1]
    assert spread(b0) < 0.5 * spread(epoch(plain, 0))  # batches hold prompts of similar length
