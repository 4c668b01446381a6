"""The LightningModule: the latent model (``vtrans.latent.model``) trained by an ELBO.

The backbone comes in through the constructor and never trains; only the latent's
parameters reach the optimizer and the checkpoint. The checkpoint records which backbone it
belongs to (its spec and a fingerprint of its config and weights). What scoring reads (the
forward pieces, the latent's distributions, the weights a checkpoint holds) is
:class:`vtrans.latent.model.LatentModel`'s; this module adds the training steps and the optimizer;
the loss of a batch is ``vtrans.latent.elbo``'s and what training logs ``vtrans.latent.stats``'.
"""

from __future__ import annotations

import re
import warnings

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torchmetrics import MeanMetric

from vtrans.backbone.frozen import FrozenCache
from vtrans.backbone.loading import Backbone
from vtrans.config import check_all
from vtrans.latent.elbo import Estimator, batch_loss, make_loss
from vtrans.latent.gaussian import Prior
from vtrans.latent.model import LatentModel
from vtrans.latent.stats import LatentStats, TrainingMetrics


class LatentLM(LatentModel, TrainingMetrics):
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
        step = batch_loss(self, h, enc, prefix)
        if not torch.isfinite(step.loss):
            raise FloatingPointError(
                f"non-finite loss ({step.loss.item()}) at {stage} step {self.global_step}: "
                "lower lr, raise free_bits or check the data"
            )
        self._log_step(stage, step, enc.targets.shape[0])
        return step.loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")
    def configure_optimizers(self):
        params = [p for p in self.latent.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vtrans"] = {"backbone": self.backbone.spec, "fingerprint": self.fingerprint, "format": 1}
