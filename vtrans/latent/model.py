"""The latent model: a frozen causal LM with a Gaussian latent z between block k and block k+1.

:class:`LatentModel` is the whole of a trained latent: its forward pieces (the stream after
block k, the upper blocks' prefix, the logits given z), the latent's distributions, its settings,
and what it saves and how it is rebuilt (training checkpoints, ``save_pretrained`` folders; the
formats are ``vtrans.latent.saved``'s). Plain torch (no Lightning, torchmetrics or Pyro), so a
checkpoint loads for scoring without importing them. The backbone comes in through the
constructor and never trains; :class:`vtrans.latent.module.LatentLM`, the LightningModule that
trains a latent, holds one.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Self

import torch
import torch.utils.checkpoint
from torch import nn

from vtrans.backbone import tokens
from vtrans.backbone.frozen import FrozenPrefix, lower, upper_prefix, upper_suffix
from vtrans.backbone.loading import Backbone
from vtrans.backbone.tokens import Encoded
from vtrans.config import check_all
from vtrans.errors import CheckpointError, UserError
from vtrans.latent import saved
from vtrans.latent.calibration import Calibration
from vtrans.latent.gaussian import PRIORS, GaussianLatent, Prior


class LatentModel(nn.Module):
    """A causal LM with a Gaussian latent z between block k and block k+1.

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

    Attributes:
        settings: the arguments it was built with (``layer`` resolved), plus, for a latent loaded
            from what training saved, the training settings recorded with it (kept, unread).
        template: the prompt template it was trained with, where what it was loaded from says.
        calibration: the map from its recommended score to ``p_wrong``
            (``vtrans.latent.calibration.Calibration``) fitted on its validation split, where what
            it was loaded from holds one; else None, and ``calibration_missing`` says why.
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
        self.settings: dict[str, Any] = dict(
            layer=layer, d_z=d_z, prior=prior, hidden=hidden, gradient_checkpointing=gradient_checkpointing
        )
        self.template: str | None = None
        self.calibration: Calibration | None = None
        self.calibration_missing = "it was built in this process with none (train.py fit fits one on the validation split)"
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        """Where the latent's weights are (and so where ``encode`` puts its tensors)."""
        return self.latent.proj.weight.device

    @property
    def fingerprint(self) -> str:
        """The backbone's fingerprint (``Backbone.fingerprint``), computed once."""
        if self._fingerprint is None:
            self._fingerprint = self.backbone.fingerprint()
        return self._fingerprint

    # ------------------------------------------------------------------ inputs

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def target_ids(self, targets: list[str]) -> list[list[int]]:
        return tokens.target_ids(self.tokenizer, targets)

    def encode(self, prompts: list[str], targets: list[list[int]] | None = None) -> Encoded:
        return tokens.encode(self.tokenizer, prompts, targets, self.device)

    # ------------------------------------------------------------------ forward pieces

    def lower(self, enc: Encoded) -> torch.Tensor:
        """The raw residual stream after block k, (B, T, C); no autograd below the latent."""
        return lower(self.backbone.model, self.layer, enc)

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

    @torch.no_grad()
    def nll_at_mean(self, prompts: list[str], tokens_next: list[int]) -> torch.Tensor:
        """(B,) −log p(y | prompt, z = the mean of z's inference distribution) of each prompt's
        next token y (``tokens_next``): ``adapter_nll``, from these prompts alone (the estimator
        reads the same from a run's shared forward)."""
        enc = self.encode(prompts, [[t] for t in tokens_next])
        h = self.lower(enc)
        logits = self.decode(h, self.latent.mean(self.states(h, enc)[0]), enc)[:, 0].float()  # (B, V)
        y = torch.tensor(tokens_next, device=logits.device)
        return torch.logsumexp(logits, -1) - logits.gather(1, y[:, None]).squeeze(1)

    def states(self, h: torch.Tensor, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-k states at the scored position and at the last token, (B, C) each."""
        rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, enc.scored], h[:, -1]

    def distributions(self, h: torch.Tensor, enc: Encoded):
        """(q_loc, q_scale, p_loc, p_scale), each (B, d_z)."""
        h_scored, h_last = self.states(h, enc)
        return (*self.latent.posterior(h_scored, h_last), *self.latent.prior_params(h_scored))

    # ------------------------------------------------------------------ weights: the latent's only

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """The latent's weights, never the backbone's (also where this model is a submodule)."""
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(f"{prefix}backbone.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        extra = [k for k in state_dict if k.startswith("backbone.")]
        if extra:
            raise ValueError(f"checkpoint carries backbone weights ({extra[0]}, ...): it is not a vtrans checkpoint")
        missing = [k for k in self.state_dict() if k not in state_dict]
        if strict and missing:
            raise KeyError(f"checkpoint lacks {missing}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ------------------------------------------------------------------ rebuilt from what was saved

    @classmethod
    def from_settings(cls, backbone: Backbone, settings: dict) -> Self:
        """A latent built around ``backbone`` with recorded settings; the training ones it does
        not take are kept in its ``settings``, for the record.

        Raises:
            TypeError: a setting that neither this class nor training knows.
            ConfigError: a setting out of range.
        """
        own = set(inspect.signature(cls).parameters) - {"backbone"}
        unknown = sorted(set(settings) - own - set(saved.TRAINING_KEYS))
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(map(str, unknown))}")
        model = cls(backbone, **{k: v for k, v in settings.items() if k in own})
        model.settings.update(settings)
        return model

    @classmethod
    def from_saved(
        cls, what: str, spec: dict, fingerprint: str, settings: dict, state: dict, backbone: Backbone | None = None
    ) -> Self:
        """A saved latent rebuilt and tied to its base model: the one way both formats load.

        Args:
            what: the file or folder it came from, for messages.
            spec: the backbone's spec as saved (``Backbone.spec``).
            fingerprint: the backbone's fingerprint as saved.
            settings: the latent's settings.
            state: its weights (``state_dict``: the latent's only).
            backbone: the base model to use; default: load the one ``spec`` names (a model that
                was in memory cannot be: it must be given). Either way its fingerprint must be
                ``fingerprint``.

        Raises:
            CheckpointError: a model in memory not given; a backbone of another fingerprint (both
                named); settings or weights that do not build this version's latent.
        """
        backbone = saved.backbone_of(what, spec, fingerprint, backbone)
        try:
            model = cls.from_settings(backbone, settings)
        except (TypeError, ValueError, UserError) as err:
            raise CheckpointError(f"{what} holds latent settings this version cannot build: {err}") from None
        model._fingerprint = fingerprint
        try:
            model.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{what} does not fit this latent: {saved.first_line(err)}") from None
        return model

    def save_pretrained(self, directory: str | Path, template: str | None = None) -> Path:
        """Write the latent into ``directory`` (made if needed), the way the Hugging Face
        ecosystem expects: ``model.safetensors`` (its weights, never the backbone's) and
        ``config.json`` (its settings, the backbone's spec and fingerprint, the template, its
        calibration or why it has none, the format). :meth:`from_pretrained` loads it back.

        Args:
            directory: the folder; files of the same names in it are replaced (each one whole).
            template: the prompt template it was trained with (default: the one it was loaded with, if any).

        Returns:
            The folder.

        Raises:
            ValueError: weights that hold NaN or infinite values (nothing is written).
        """
        config = {
            "settings": {k: v for k, v in self.settings.items() if not str(k).startswith("_")},
            "backbone": self.backbone.spec,
            "fingerprint": self.fingerprint,
            "template": self.template if template is None else template,
            **saved.calibration_record(self.calibration, self.calibration_missing),
        }
        return saved.write_pretrained(directory, self.state_dict(), config)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: Backbone | None = None, device: str | torch.device | None = None
    ) -> Self:
        """The latent :meth:`save_pretrained` wrote into ``directory``, in eval mode.

        Args:
            directory: the folder.
            backbone: the base model (e.g. ``Backbone.from_model(model, tokenizer)``); default: load
                the one the folder names. Either way its fingerprint must be the folder's.
            device: where to put the latent (and the backbone); default: where the backbone is.

        Raises:
            CheckpointError: a folder without these files or with damaged ones, settings this
                version does not know, or another base model (both named).
        """
        config, state = saved.read_pretrained(directory)
        model = cls.from_saved(str(directory), config["backbone"], config["fingerprint"], config["settings"], state, backbone)
        model.template = config["template"]
        model.calibration, model.calibration_missing = saved.calibration_of(config, str(directory))
        return model.to(model.backbone.device if device is None else device).eval()
