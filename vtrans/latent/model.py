"""The latent model: a frozen causal LM with a Gaussian latent z between block k and block k+1.

What scoring reads, and nothing of training: the forward pieces (the stream after block k, the
upper blocks' prefix, the logits given z), the latent's distributions, and checkpoints that hold
the latent's weights only. Plain torch (no Lightning, torchmetrics or Pyro), so a checkpoint
loads for scoring without importing them (``vtrans.latent.checkpoint.load``). The backbone comes in
through the constructor and never trains. ``vtrans.latent.module.LatentLM`` extends this class with
the ELBO and its training loop.

What it saves and how it is rebuilt (checkpoints, ``save_pretrained`` folders) is
``vtrans.latent.saved``'s: :class:`LatentModel` has it as a base.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from vtrans.backbone import architectures, tokens
from vtrans.backbone.frozen import FrozenPrefix, upper_prefix, upper_suffix
from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import Encoded
from vtrans.config import check_all
from vtrans.latent.gaussian import PRIORS, GaussianLatent, Prior
from vtrans.latent.saved import Pretrained


class Settings(dict):
    """The settings a latent was built with; a dict whose keys also read as attributes
    (``hparams.d_z``), like the ``hparams`` of a LightningModule."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


class LatentModel(Pretrained, nn.Module):
    """A causal LM with a Gaussian latent z between block k and block k+1: its forward pieces.

    Args:
        backbone: the frozen causal LM (``vtrans.backbone.loading.Backbone``).
        layer: number of blocks below the latent (z enters after block ``layer``);
            1 ≤ layer ≤ n_layers − 1; default the middle, n_layers // 2.
        d_z: latent dimension.
        prior: ``standard`` (p(z) = N(0, I), q(z|prompt)), ``conditional``
            (q(z|prompt, target), learned prior p(z|prompt)) or ``deterministic`` (the twin:
            z = the prior network's mean, trained by maximum likelihood, no KL).
        hidden: width of the encoder MLPs.
        gradient_checkpointing: recompute the upper blocks' activations in the backward pass
            instead of keeping them (less memory for long targets or large batches, more time).
    """

    def __init__(
        self,
        backbone: Backbone,
        layer: int | None = None,
        d_z: int = 16,
        prior: Prior = "conditional",
        hidden: int = 256,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        layer = backbone.n_layers // 2 if layer is None else layer
        check_all(
            [
                (1 <= layer < backbone.n_layers, f"layer must be in 1..{backbone.n_layers - 1}, got {layer}"),
                (d_z >= 1, f"d_z must be >= 1, got {d_z}"),
                (hidden >= 1, f"hidden must be >= 1, got {hidden}"),
                (prior in PRIORS, f"prior must be one of {', '.join(PRIORS)}, got {prior!r}"),
            ]
        )
        self.layer = layer
        self.backbone = backbone
        self.latent = GaussianLatent(backbone.d_model, d_z, prior, hidden)
        self.gradient_checkpointing = gradient_checkpointing
        self._settings = Settings(
            layer=layer, d_z=d_z, prior=prior, hidden=hidden, gradient_checkpointing=gradient_checkpointing
        )
        self._fingerprint: str | None = None
        self.laplace = None  # a vtrans.latent.laplace.LaplacePosterior, fitted after training (never in a checkpoint)
        self.template: str | None = None  # the prompt template it was trained with, where what it was loaded from says

    @property
    def hparams(self) -> Settings:
        """The settings it was built with; a latent loaded to score also holds those it was trained with."""
        return self._settings

    @property
    def device(self) -> torch.device:
        """Where the latent's weights are (and so where ``encode`` puts its tensors)."""
        return self.latent.proj.weight.device

    # ------------------------------------------------------------------ inputs

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def target_ids(self, targets: list[str]) -> list[list[int]]:
        return tokens.target_ids(self.tokenizer, targets)

    def encode(self, prompts: list[str], targets: list[list[int]] | None = None) -> Encoded:
        return tokens.encode(self.tokenizer, prompts, targets, self.device)

    # ------------------------------------------------------------------ forward pieces

    @torch.no_grad()
    def lower(self, enc: Encoded) -> torch.Tensor:
        """The raw residual stream after block k, (B, T, C); no autograd below the latent."""
        with architectures.blocks_until(self.backbone.model, self.layer) as body:
            out = body(
                **enc.inputs,
                use_cache=False,
            )
        return out.last_hidden_state

    @torch.no_grad()
    def prefix(self, h: torch.Tensor, enc: Encoded) -> FrozenPrefix:
        """Keys/values of the upper blocks for the positions before every scored one.

        z enters at the scored position and after, so nothing before it depends on z: these
        positions run once, without autograd, and every sample of z reuses them.
        """
        split = int(enc.scored.min())
        return upper_prefix(self.backbone.model, self.layer, h, enc.attention_mask, enc.position_ids, split)

    def decode(
        self, h: torch.Tensor, z: torch.Tensor, enc: Encoded, prefix: FrozenPrefix | None = None
    ) -> torch.Tensor:
        """Logits for the target slots given z, (B, N, V): z enters from the scored position on.

        Only the suffix (the scored position and the target tokens) runs through the upper blocks
        with z; the prefix comes from ``prefix`` (computed here when not given).
        """
        prefix = self.prefix(h, enc) if prefix is None else prefix
        split, n = prefix.length, enc.targets.shape[1]
        suffix = self.latent.inject(h[:, split:], z, enc.after_scored[:, split:])  # (B, T-split, C)

        def run(stream: torch.Tensor) -> torch.Tensor:
            return upper_suffix(
                self.backbone.model, self.layer, stream, enc.attention_mask, enc.position_ids, prefix, logits_to_keep=n + 1
            )

        if self.gradient_checkpointing and torch.is_grad_enabled():
            logits = torch.utils.checkpoint.checkpoint(run, suffix, use_reentrant=False)
        else:
            logits = run(suffix)
        return tokens.slot_positions(logits, enc)  # (B, N, V)

    def states(self, h: torch.Tensor, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-k states at the scored position and at the last token, (B, C) each."""
        rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, enc.scored], h[:, -1]

    def distributions(self, h: torch.Tensor, enc: Encoded):
        """(q_loc, q_scale, p_loc, p_scale), each (B, d_z)."""
        h_scored, h_last = self.states(h, enc)
        return (*self.latent.posterior(h_scored, h_last), *self.latent.prior_params(h_scored))
