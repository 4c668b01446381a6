"""The ELBO of the latent, written as a Pyro model and guide.

    model:  z ~ p(z | prompt)          (N(0, I) or the learned conditional prior)
            target ~ Categorical(LM(prompt, z))
    guide:  z ~ q(z | prompt[, target])

The loss comes from ``Trace_ELBO`` or ``TraceMeanField_ELBO`` (analytic KL). β scales the
z site in both model and guide, so the loss is NLL + β·KL. Free bits are added outside Pyro
as β·Σ_d max(0, λ − KL̄_d), which turns Σ_d KL̄_d into Σ_d max(λ, KL̄_d) in value and gradient.
Pyro never sees a parameter: the model and guide read tensors computed by torch modules
(``pyro.settings.set(module_local_params=True)``), so the frozen backbone stays out of the
parameter store and only the latent reaches the optimizer.

:func:`batch_loss` is the loss of one training batch: the negative ELBO (with free bits) of a
variational latent, or the deterministic twin's negative log-likelihood of the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from vtrans.latent.gaussian import kl_normal

pyro.settings.set(module_local_params=True)

Estimator = Literal["trace", "meanfield"]


@dataclass
class ELBOInputs:
    """Everything the model and guide read for one batch.

    Attributes:
        q_loc, q_scale: posterior parameters, (B, d_z).
        p_loc, p_scale: prior parameters, (B, d_z).
        decode: z (B, d_z) -> target logits (B, N, V).
        targets: (B, N) target token ids (padding anywhere ``target_mask`` is False).
        target_mask: (B, N) bool.
        beta: weight of the KL term, > 0.
    """

    q_loc: torch.Tensor
    q_scale: torch.Tensor
    p_loc: torch.Tensor
    p_scale: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor]
    targets: torch.Tensor
    target_mask: torch.Tensor
    beta: float


def model(x: ELBOInputs) -> None:
    batch = x.targets.shape[0]
    with pyro.plate("items", batch):
        with poutine.scale(scale=x.beta):
            z = pyro.sample("z", dist.Normal(x.p_loc, x.p_scale).to_event(1))  # (B, d_z)
        logits = x.decode(z).float()  # (B, N, V)
        pyro.sample(
            "target",
            dist.Categorical(logits=logits).mask(x.target_mask).to_event(1),
            obs=x.targets,
        )


def guide(x: ELBOInputs) -> None:
    batch = x.targets.shape[0]
    with pyro.plate("items", batch), poutine.scale(scale=x.beta):
        pyro.sample("z", dist.Normal(x.q_loc, x.q_scale).to_event(1))


def make_loss(estimator: Estimator = "meanfield", num_particles: int = 1):
    """``loss_fn(inputs) -> -ELBO`` summed over the batch (an ``ELBOModule``)."""
    cls = TraceMeanField_ELBO if estimator == "meanfield" else Trace_ELBO
    return cls(num_particles=num_particles, max_plate_nesting=1)(model, guide)


def free_bits_penalty(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Σ_d max(0, λ − mean_b KL_bd): added (times β) to the per-item loss. kl_per_dim: (B, d_z)."""
    if free_bits <= 0:
        return kl_per_dim.new_zeros(())
    return torch.relu(free_bits - kl_per_dim.mean(0)).sum()


def completion_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−log p(target) per item, (B,): the target slots' cross-entropies summed over the real ones.

    logits: (B, N, V); targets, mask: (B, N) (padding wherever ``mask`` is False).
    """
    per_slot = F.cross_entropy(logits.float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    return (per_slot * mask).sum(-1)


@dataclass
class Loss:
    """One batch's loss and the parts of it that training logs.

    Attributes:
        loss: what the optimizer minimises: NLL + β·KL per item plus β times the free-bits
            penalty (the twin: the NLL per item).
        nll: the NLL per item, detached.
        q_loc: (B, d_z) the posterior mean (the twin: its z).
        kl_dim: (B, d_z) the KL per item and dimension (the twin: zeros).
        beta: the weight of the KL term at this step (the twin: 0).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    q_loc: torch.Tensor
    kl_dim: torch.Tensor
    beta: float


def batch_loss(
    model, h: torch.Tensor, enc, prefix, loss_fn: Callable[[ELBOInputs], torch.Tensor], beta: float, free_bits: float
) -> Loss:
    """The loss of one batch of a ``LatentModel``: the stream after block k ``h`` (B, T, C), its
    encoding ``enc`` and the upper blocks' prefix, shared by every particle; ``loss_fn`` from
    :func:`make_loss`, ``beta`` the KL's weight at this step, ``free_bits`` in nats per dimension."""
    n_items = enc.targets.shape[0]
    if model.latent.prior == "deterministic":  # the twin: maximum likelihood with z at the prior network's mean
        q_loc = model.latent.mean(model.states(h, enc)[0])
        loss = completion_nll(model.decode(h, q_loc, enc, prefix), enc.targets, enc.target_mask).mean()
        kl_dim, beta = torch.zeros_like(q_loc), 0.0
        nll = loss.detach()
    else:
        q_loc, q_scale, p_loc, p_scale = model.distributions(h, enc)
        inputs = ELBOInputs(
            q_loc, q_scale, p_loc, p_scale, lambda z: model.decode(h, z, enc, prefix), enc.targets, enc.target_mask, beta
        )
        neg_elbo_beta = loss_fn(inputs) / n_items  # NLL + β·KL, per item
        kl_dim = kl_normal(q_loc, q_scale, p_loc, p_scale)  # (B, d_z)
        loss = neg_elbo_beta + beta * free_bits_penalty(kl_dim, free_bits)
        nll = (neg_elbo_beta - beta * kl_dim.sum(-1).mean()).detach()
    return Loss(loss, nll, q_loc, kl_dim, beta)
