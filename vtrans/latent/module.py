"""The LightningModule that trains a latent (``vtrans.latent.model.LatentModel``) by an ELBO.

:class:`LatentLM` holds the latent model it trains (``self.model``) and adds what training needs:
the loss (``vtrans.latent.elbo``), the metrics it logs, the optimizer over the latent's
parameters, and the record of the backbone a checkpoint belongs to. The backbone comes in through
the constructor and never trains; the checkpoint's ``state_dict`` is the latent model's own (the
latent's weights, with the keys ``LatentModel.state_dict`` gives them), so a checkpoint is read to
score with no Lightning.
"""

from __future__ import annotations

import inspect
import re
import warnings

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torchmetrics import MeanMetric

from vtrans.backbone.frozen import FrozenCache
from vtrans.backbone.loading import Backbone
from vtrans.config import check_all
from vtrans.latent.elbo import Estimator, Loss, batch_loss, make_loss
from vtrans.latent.gaussian import Prior
from vtrans.latent.model import LatentModel
from vtrans.latent.stats import LatentStats

STAGES = ("train", "val", "test")


class LatentLM(L.LightningModule):
    """Trains a :class:`vtrans.latent.model.LatentModel` (``self.model``) by an ELBO."""

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
        # LightningCLI (train.py --help) reads each argument's help from this docstring
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
        super().__init__()
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
        self.model = LatentModel(backbone, layer, d_z, prior, hidden, gradient_checkpointing)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams.layer = self.model.layer
        self.model.settings.update({k: v for k, v in self.hparams.items() if k not in self.model.settings})
        self.loss_fn = make_loss(elbo, num_particles)
        self.stats = torch.nn.ModuleDict({f"{s}_latent": LatentStats(d_z) for s in STAGES})
        self.means = torch.nn.ModuleDict({f"{s}_{m}": MeanMetric() for s in STAGES for m in ("nll", "kl", "elbo")})
        self.frozen_cache = FrozenCache()
        self._quiet: warnings.catch_warnings | None = None

    @classmethod
    def from_model(cls, model: LatentModel) -> LatentLM:
        """The LightningModule that goes on training ``model``, with the training settings it records."""
        own = set(inspect.signature(cls).parameters) - {"backbone"}
        module = cls(model.backbone, **{k: v for k, v in model.settings.items() if k in own})
        module.model = model
        return module

    # ------------------------------------------------------------------ the checkpoint: the latent model's weights

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.model.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        model = self.model
        checkpoint["vtrans"] = {"backbone": model.backbone.spec, "fingerprint": model.fingerprint, "format": 1}

    # ------------------------------------------------------------------ training

    def on_fit_start(self) -> None:
        """Tell Lightning that the backbone's modules are in eval mode on purpose, until training starts.

        The frozen backbone computes the same function in every step, so its dropout stays off
        (``Backbone.train`` keeps it in eval mode). Lightning warns, between this hook and
        ``on_train_start``, about every module in eval mode, for parts that should train and were
        left in eval mode; it has no switch for parts that should not. So its warning is silenced
        for exactly the backbone's modules (any other module in eval mode changes the count, and
        the warning stands), and the filter goes again when training starts.
        """
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if in_eval and all(name == "model.backbone" or name.startswith("model.backbone.") for name in in_eval):
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            expected = f"Found {len(in_eval)} module(s) in eval mode at the start of training"
            warnings.filterwarnings("ignore", message=re.escape(expected), category=PossibleUserWarning)

    def on_train_start(self) -> None:
        self._restore_warnings()

    def teardown(self, stage: str) -> None:
        self._restore_warnings()  # a fit stopped before training started

    def _restore_warnings(self) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    def current_beta(self) -> float:
        beta, warmup = self.hparams.beta, self.hparams.kl_warmup_steps
        if not self.training or warmup == 0:
            return beta
        return beta * min(1.0, (self.global_step + 1) / warmup)

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        model = self.model
        targets = model.target_ids(batch["target"])
        if self.hparams.cache_frozen:
            enc, h, prefix = self.frozen_cache.batch(model.backbone, model.layer, batch["prompt"], targets)
        else:
            enc = model.encode(batch["prompt"], targets)
            h = model.lower(enc)  # (B, T, C)
            prefix = model.prefix(h, enc)  # shared by every particle
        step = batch_loss(model, h, enc, prefix, self.loss_fn, self.current_beta(), self.hparams.free_bits)
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
        params = [p for p in self.model.latent.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ what training logs

    def _log_step(self, stage: str, step: Loss, n_items: int) -> None:
        """One step's loss and the ELBO's parts (means over the epoch, weighted by items), and the
        batch's share of the epoch's latent statistics (``vtrans.latent.stats``)."""
        kl = step.kl_dim.sum(-1)  # (B,)
        self.stats[f"{stage}_latent"].update(step.q_loc, step.kl_dim)
        for name, value in (("nll", step.nll), ("kl", kl.mean()), ("elbo", -(step.nll + kl.mean()))):
            metric = self.means[f"{stage}_{name}"]
            metric.update(value.detach(), weight=n_items)
            shown = name == "kl" and stage != "train"  # the KL per item, in the progress bar after validation
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=shown, batch_size=n_items)
        self.log(
            f"{stage}/loss", step.loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=n_items, sync_dist=True
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
