"""The latent's statistics over an epoch, which training logs at each epoch's end beside the
ELBO's parts (``vtrans.latent.module.LatentLM``): the per-dimension KL and how many dimensions
are active (the spread of the posterior mean across items).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z_u]) > 0.01


class LatentStats(Metric):
    """Per-dimension KL and the spread of the posterior mean across items, over an epoch."""

    full_state_update = False

    def __init__(self, d_z: int) -> None:
        super().__init__()
        for name in ("kl_sum", "loc_sum", "loc_sq_sum"):
            self.add_state(name, default=torch.zeros(d_z, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, q_loc: torch.Tensor, kl_per_dim: torch.Tensor) -> None:
        self.kl_sum += kl_per_dim.detach().double().sum(0)
        self.loc_sum += q_loc.detach().double().sum(0)
        self.loc_sq_sum += q_loc.detach().double().pow(2).sum(0)
        self.count += q_loc.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1)
        kl_dim = self.kl_sum / n
        loc_var = self.loc_sq_sum / n - (self.loc_sum / n).pow(2)
        active = (loc_var > ACTIVE_UNIT_THRESHOLD).sum()
        return {
            "kl_dim": kl_dim.float(),
            "kl_dim_max": kl_dim.max().float(),
            "kl_dim_min": kl_dim.min().float(),
            "active_units": active.float(),
            "active_fraction": (active / kl_dim.numel()).float(),
        }
