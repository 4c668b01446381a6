"""The latent's scores of the whole answer: every answer token, teacher-forced, under one z.

The latent is trained with one z per answer: drawn at the prompt and entered at the scored
position and every answer position after it (``LatentModel.decode``, as the ELBO's likelihood
reads it). So the latent's probability of an answer y_1..y_T under one z is
Π_t p(y_t | prompt, y_<t, z), and its predictive integrates z out of the whole product:

* ``adapter_answer_nll`` = −Σ_t log p(y_t | prompt, y_<t, z = m(prompt)), z at the mean of its
  inference distribution: ``adapter_nll`` of the whole answer (the deterministic twin's own score);
* ``latent_answer_nll`` = −log (1/S) Σ_s Π_t p(y_t | prompt, y_<t, z_s) over S samples of z: the
  latent predictive's surprise at the whole answer, ``latent_nll`` of the whole answer;
* ``latent_answer_gap`` = (1/S) Σ_s −log Π_t p(y_t | …, z_s) − ``latent_answer_nll`` ≥ 0 (Jensen's
  gap): how much the spread of z alone moves the answer's probability, the answer's share of
  ``latent_mi``'s reading (0 for a z that changes nothing).

With a one-token answer they equal ``adapter_nll``, ``latent_nll`` (the same draws of z) and the
answer's own Jensen gap. Each sample runs the answer positions through the blocks above the
latent; the positions before the scored one run once (``LatentModel.prefix``) and are shared.
"""

from __future__ import annotations

import math

import torch

from vtrans.backbone.tokens import Encoded
from vtrans.estimators.base import Context, Family, Forward, Shown
from vtrans.estimators.latent import inference_distribution, item_noise, layer_state


def answer_nll(logits: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """(B,) −Σ_t log p(y_t) over each item's real answer slots, from slot logits (B, N, V)."""
    logits = logits.float()
    per_slot = logits.logsumexp(-1) - logits.gather(-1, enc.targets.unsqueeze(-1)).squeeze(-1)  # (B, N)
    return per_slot.masked_fill(~enc.target_mask, 0).sum(1)


@torch.no_grad()
def read(forward: Forward, context: Context) -> dict[str, torch.Tensor]:
    module, enc, cfg = context.module, forward.enc, context.config
    h = layer_state(forward, module)
    prefix = module.prefix(h, enc)
    mean = module.latent.mean(module.states(h, enc)[0])
    result = {"adapter_answer_nll": answer_nll(module.decode(h, mean, enc, prefix), enc)}
    if module.latent.prior == "deterministic":  # no spread: the mean is all there is
        return result
    loc, scale = inference_distribution(module, h, enc)
    eps = item_noise(context.indices, cfg.samples, loc.shape[1], cfg.seed, cfg.z_draws).to(loc)  # latent_nll's draws
    per_sample = torch.stack(
        [answer_nll(module.decode(h, loc + scale * eps[:, s], enc, prefix), enc) for s in range(cfg.samples)], 1
    )  # (B, S): −log Π_t p(y_t | z_s)
    nll = -(torch.logsumexp(-per_sample, 1) - math.log(cfg.samples))
    result["latent_answer_nll"] = nll
    result["latent_answer_gap"] = (per_sample.mean(1) - nll).clamp(min=0)
    return result


FAMILY = Family(
    "latent_answer",
    {
        "adapter_answer_nll": "−log p(answer|prompt, z = its mean), every answer token: adapter_nll of the whole answer",
        "latent_answer_nll": "−log E_z Π_t p(y_t|prompt, y_<t, z) over S samples: the latent predictive's surprise at the whole answer",
        "latent_answer_gap": "E_z[−log p(answer|z)] − latent_answer_nll: how much z's spread moves the whole answer's probability",
    },
    read,
    needs=frozenset({"latent", "hidden_states", "whole_word"}),
    name_needs={"latent_answer_nll": frozenset({"variational"}), "latent_answer_gap": frozenset({"variational"})},
    extra_passes=True,
    shown=Shown(default_score=False, prose={"cost": "the latent's passes over the whole answer (`latent_answer_*`)"}),
)
