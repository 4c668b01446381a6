"""The LightningModule: the latent model (``vtrans.latent.model``) trained by an ELBO.

The backbone comes in through the constructor and never trains; only the latent's
parameters reach the optimizer and the checkpoint. The checkpoint records which backbone it
belongs to (its spec and a fingerprint of its config and weights). What scoring reads (the
forward pieces, the latent's distributions, the weights a checkpoint holds) is
:class:`vtrans.latent.model.LatentModel`'s; this module adds the loss, the metrics and the optimizer.
"""

from __future__ import annotations

import re
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torchmetrics import MeanMetric, Metric

from vtrans.backbone.frozen import FrozenCache
from vtrans.backbone.loading import Backbone
from vtrans.config import check_all
from vtrans.latent.elbo import ELBOInputs, Estimator, free_bits_penalty, make_loss
from vtrans.latent.gaussian import Prior, kl_normal
from vtrans.latent.model import LatentModel

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z_u]) > 0.01


def completion_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−log p(target) per item, (B,): the target slots' cross-entropies summed over the real ones.

    logits: (B, N, V); targets, mask: (B, N) (padding wherever ``mask`` is False).
    """
    per_slot = F.cross_entropy(logits.float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    return (per_slot * mask).sum(-1)


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


class LatentLM(LatentModel, L.LightningModule):
    """A causal LM with a Gaussian latent z between block k and block k+1, trained by an ELBO.

    The forward pieces and the weights a checkpoint holds are :class:`vtrans.latent.model.LatentModel`'s;
    this class adds the loss, the metrics and the optimizer.
    """

    # Lightning keeps these itself: the settings of every argument (save_hyperparameters) and the
    # device the trainer moved the module to
    hparams = L.LightningModule.hparams
    device = L.LightningModule.device

    def __init__(
        self,
        backbone: Backbone,
        layer: int | None = None,
        d_z: int = 16,
        prior: Prior = "conditional",
        hidden: int = 256,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        elbo: Estimator = "meanfield",
        num_particles: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cache_frozen: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        # the arguments LatentModel takes are documented again here: LightningCLI (train.py --help)
        # reads each argument's help from this docstring
        """Build the latent around a frozen backbone.

        Args:
            backbone: the frozen causal LM (``vtrans.backbone.loading.Backbone``).
            layer: number of blocks below the latent (z enters after block ``layer``);
                1 ≤ layer ≤ n_layers − 1; default the middle, n_layers // 2.
            d_z: latent dimension.
            prior: ``standard`` (p(z) = N(0, I), q(z|prompt)), ``conditional``
                (q(z|prompt, target), learned prior p(z|prompt)) or ``deterministic``
                (the twin: z = the prior network's mean, trained by maximum likelihood of the
                target; beta, kl_warmup_steps, free_bits, elbo and num_particles do not apply).
            hidden: width of the encoder MLPs.
            beta: weight of the KL term in the ELBO (β-VAE); > 0.
            kl_warmup_steps: β rises linearly from β/steps to β over this many training steps.
            free_bits: nats per latent dimension below which the KL is not penalised (0 = off).
            elbo: ``meanfield`` (TraceMeanField_ELBO, analytic KL) or ``trace`` (Trace_ELBO).
            num_particles: samples of z per item in the ELBO estimate.
            lr: AdamW learning rate for the latent's parameters.
            weight_decay: AdamW weight decay.
            cache_frozen: keep what the frozen backbone computes for each item (the stream after
                block k, the upper blocks' keys/values before the scored position) across epochs,
                so later epochs run only the scored position and the target through the upper blocks.
            gradient_checkpointing: recompute the upper blocks' activations in the backward pass
                instead of keeping them (less memory for long targets or large batches, more time).
        """
        super().__init__(backbone, layer, d_z, prior, hidden, gradient_checkpointing)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams.layer = self.layer
        check_all(
            [
                (beta > 0, f"beta must be > 0, got {beta} (use a small value to weaken the KL term)"),
                (kl_warmup_steps >= 0, f"kl_warmup_steps must be >= 0, got {kl_warmup_steps}"),
                (free_bits >= 0, f"free_bits must be >= 0 nats, got {free_bits}"),
                (elbo in ("meanfield", "trace"), f"elbo must be meanfield or trace, got {elbo!r}"),
                (num_particles >= 1, f"num_particles must be >= 1, got {num_particles}"),
                (lr > 0, f"lr must be > 0, got {lr}"),
                (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
            ]
        )
        self.loss_fn = make_loss(elbo, num_particles)
        self.stats = torch.nn.ModuleDict({f"{s}_latent": LatentStats(d_z) for s in ("train", "val", "test")})
        self.means = torch.nn.ModuleDict(
            {f"{s}_{m}": MeanMetric() for s in ("train", "val", "test") for m in ("nll", "kl", "elbo")}
        )
        self.frozen_cache = FrozenCache()

    # ------------------------------------------------------------------ training

    def on_fit_start(self) -> None:
        """Tell Lightning that the backbone's modules are in eval mode on purpose.

        The frozen backbone computes the same function in every step, so its dropout stays off
        (``Backbone.train`` keeps it in eval mode). Lightning warns about every module in eval
        mode at the start of training, for parts that should train and were left in eval mode
        (a Hugging Face model loads in it); it has no switch for parts that should not. So its
        warning is silenced for exactly the backbone's modules: any other module in eval mode
        changes the count, and the warning stands.
        """
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if in_eval and all(name == "backbone" or name.startswith("backbone.") for name in in_eval):
            expected = f"Found {len(in_eval)} module(s) in eval mode at the start of training"
            warnings.filterwarnings("ignore", message=re.escape(expected), category=PossibleUserWarning)

    def current_beta(self) -> float:
        beta, warmup = self.hparams.beta, self.hparams.kl_warmup_steps
        if not self.training or warmup == 0:
            return beta
        return beta * min(1.0, (self.global_step + 1) / warmup)

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        targets = self.target_ids(batch["target"])
        if self.hparams.cache_frozen:
            enc, h, prefix = self.frozen_cache.batch(self, batch["prompt"], targets)
        else:
            enc = self.encode(batch["prompt"], targets)
            h = self.lower(enc)  # (B, T, C)
            prefix = self.prefix(h, enc)  # shared by every particle
        n_items = enc.targets.shape[0]
        if self.latent.prior == "deterministic":  # the twin: maximum likelihood with z at the prior network's mean
            q_loc = self.latent.mean(self.states(h, enc)[0])
            loss = completion_nll(self.decode(h, q_loc, enc, prefix), enc.targets, enc.target_mask).mean()
            kl_dim, beta = torch.zeros_like(q_loc), 0.0
            nll = loss.detach()
        else:
            q_loc, q_scale, p_loc, p_scale = self.distributions(h, enc)
            beta = self.current_beta()
            inputs = ELBOInputs(
                q_loc, q_scale, p_loc, p_scale, lambda z: self.decode(h, z, enc, prefix), enc.targets, enc.target_mask, beta
            )
            neg_elbo_beta = self.loss_fn(inputs) / n_items  # NLL + β·KL, per item
            kl_dim = kl_normal(q_loc, q_scale, p_loc, p_scale)  # (B, d_z)
            loss = neg_elbo_beta + beta * free_bits_penalty(kl_dim, self.hparams.free_bits)
            nll = (neg_elbo_beta - beta * kl_dim.sum(-1).mean()).detach()
        kl = kl_dim.sum(-1)  # (B,)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at {stage} step {self.global_step}: "
                "lower lr, raise free_bits or check the data"
            )
        self.stats[f"{stage}_latent"].update(q_loc, kl_dim)
        for name, value in (("nll", nll), ("kl", kl.mean()), ("elbo", -(nll + kl.mean()))):
            metric = self.means[f"{stage}_{name}"]
            metric.update(value.detach(), weight=n_items)
            shown = name == "kl" and stage != "train"  # the KL per item, in the progress bar after validation
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=shown, batch_size=n_items)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=n_items,
            sync_dist=True,
        )
        if stage == "train":
            self.log("train/beta", beta, on_step=True, on_epoch=False)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

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

    def configure_optimizers(self):
        params = [p for p in self.latent.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vtrans"] = {"backbone": self.backbone.spec, "fingerprint": self.fingerprint, "format": 1}

