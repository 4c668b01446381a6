"""What training logs: the ELBO's parts per step, and the latent's statistics over an epoch.

Each step logs the NLL, the KL and the ELBO per item (means over the epoch, weighted by items),
the loss, and in training β. At each epoch's end :class:`LatentStats` adds the per-dimension KL
and how many dimensions are active (the spread of the posterior mean across items).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch
from torchmetrics import Metric

if TYPE_CHECKING:
    from vtrans.latent.elbo import Loss

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


class TrainingMetrics(L.LightningModule):
    """The logging of :class:`vtrans.latent.module.LatentLM`: it holds ``stats`` (a :class:`LatentStats`
    per stage, ``{stage}_latent``) and ``means`` (a ``MeanMetric`` per stage and part, ``{stage}_{part}``)."""

    def _log_step(self, stage: str, step: Loss, n_items: int) -> None:
        """One step's loss and the ELBO's parts, and the batch's share of the epoch's statistics."""
        kl = step.kl_dim.sum(-1)  # (B,)
        self.stats[f"{stage}_latent"].update(step.q_loc, step.kl_dim)
        for name, value in (("nll", step.nll), ("kl", kl.mean()), ("elbo", -(step.nll + kl.mean()))):
            metric = self.means[f"{stage}_{name}"]
            metric.update(value.detach(), weight=n_items)
            shown = name == "kl" and stage != "train"  # the KL per item, in the progress bar after validation
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=shown, batch_size=n_items)
        self.log(
            f"{stage}/loss",
            step.loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=n_items,
            sync_dist=True,
        )
        if stage == "train":
            self.log("train/beta", step.beta, on_step=True, on_epoch=False)

    def _log_stats(self, stage: str) -> None:
        stats = self.stats[f"{stage}_latent"]
        if stats.count == 0:
            return
        values = stats.compute()
        values.pop("kl_dim")  # a vector; its sum over dimensions is the KL per item, {stage}/kl
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=False, sync_dist=True)
        stats.reset()

    def on_train_epoch_end(self) -> None:
        self._log_stats("train")

    def on_validation_epoch_end(self) -> None:
        self._log_stats("val")

    def on_test_epoch_end(self) -> None:
        self._log_stats("test")
