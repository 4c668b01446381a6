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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

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
