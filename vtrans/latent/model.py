"""The latent model: a frozen causal LM with a Gaussian latent z between block k and block k+1.

What scoring reads, and nothing of training: the forward pieces (the stream after block k, the
upper blocks' prefix, the logits given z), the latent's distributions, and checkpoints that hold
the latent's weights only. Plain torch (no Lightning, torchmetrics or Pyro), so a checkpoint
loads for scoring without importing them (``vtrans.latent.checkpoint.load``). The backbone comes in
through the constructor and never trains. ``vtrans.latent.module.LatentLM`` extends this class with
the ELBO and its training loop.

A latent is rebuilt from what was saved in one place (:meth:`LatentModel.from_saved`): the
backbone it names, checked by fingerprint, its settings and its weights. Two formats hold
those: the checkpoints that training writes (``vtrans.latent.checkpoint``), and the folder that
:meth:`LatentModel.save_pretrained` writes the way the Hugging Face ecosystem expects:
``model.safetensors`` (the latent's weights, never the backbone's) beside ``config.json`` (its
settings, the backbone's spec and fingerprint, the template it was trained with, the format).
Neither is ever unpickled.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from vtrans.backbone import architectures, tokens
from vtrans.backbone.frozen import FrozenPrefix, upper_prefix, upper_suffix
from vtrans.backbone.loading import MEMORY, SPEC_KEYS, Backbone
from vtrans.backbone.tokens import Encoded
from vtrans.config import check_all
from vtrans.errors import CheckpointError, UserError
from vtrans.latent.gaussian import PRIORS, GaussianLatent, Prior

TRAINING_KEYS = ("beta", "kl_warmup_steps", "free_bits", "elbo", "num_particles", "lr", "weight_decay", "cache_frozen")
"""The latent settings that only training reads: ``LatentLM``'s arguments beyond ``LatentModel``'s
(named here so that scoring rebuilds a latent without importing Lightning). A latent loaded to
score keeps them in ``hparams``, unread."""
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the files of a folder written by save_pretrained
FORMAT, FORMAT_VERSION = "vtrans-latent", 1


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


class LatentModel(nn.Module):
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

    # ------------------------------------------------------------------ checkpoints: the latent only

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if not k.startswith("backbone."))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        extra = [k for k in state_dict if k.startswith("backbone.")]
        if extra:
            raise ValueError(f"checkpoint carries backbone weights ({extra[0]}, ...): it is not a vtrans checkpoint")
        missing = [k for k in super().state_dict() if k not in state_dict and not k.startswith("backbone.")]
        if strict and missing:
            raise KeyError(f"checkpoint lacks {missing}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    @property
    def fingerprint(self) -> str:
        """The backbone's fingerprint (``Backbone.fingerprint``), computed once."""
        if self._fingerprint is None:
            self._fingerprint = self.backbone.fingerprint()
        return self._fingerprint

    # ------------------------------------------------------------------ rebuilt from what was saved

    @classmethod
    def from_settings(cls, backbone: Backbone, settings: dict) -> LatentModel:
        """This class built around ``backbone`` with recorded settings (``hparams``); the training
        ones a ``LatentModel`` does not take are kept in its ``hparams``, for the record.

        Raises:
            TypeError: a setting that neither this class nor training knows.
            ConfigError: a setting out of range.
        """
        own = set(inspect.signature(cls).parameters) - {"backbone"}
        unknown = sorted(set(settings) - own - set(TRAINING_KEYS))
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(map(str, unknown))}")
        module = cls(backbone, **{k: v for k, v in settings.items() if k in own})
        module.hparams.update(settings)
        return module

    @classmethod
    def from_saved(
        cls,
        what: str,
        spec: dict,
        fingerprint: str,
        settings: dict,
        state: dict,
        backbone: Backbone | None = None,
    ) -> LatentModel:
        """A saved latent rebuilt and tied to its base model: the one way both formats load.

        Args:
            what: the file or folder it came from, for messages.
            spec: the backbone's spec as saved (``Backbone.spec``).
            fingerprint: the backbone's fingerprint as saved.
            settings: the latent's settings (``hparams``).
            state: its weights (``state_dict``: the latent's only).
            backbone: the base model to use; default: load the one ``spec`` names (a model that
                was in memory cannot be: it must be given). Either way its fingerprint must be
                ``fingerprint``.

        Raises:
            CheckpointError: a model in memory not given; a backbone of another fingerprint (both
                named); settings or weights that do not build this version's latent.
        """
        if backbone is None:
            if spec.get("source") == MEMORY:
                raise CheckpointError(
                    f"{what} was trained on a model held in memory ({spec['name']!r}, fingerprint {fingerprint}): "
                    "load that model and pass it as backbone=Backbone.from_model(model, tokenizer)"
                )
            backbone = Backbone(**{k: spec[k] for k in SPEC_KEYS if k in spec})
        actual = backbone.fingerprint()
        if actual != fingerprint:
            raise CheckpointError(
                f"{what} was trained on backbone {spec['name']!r} (fingerprint {fingerprint}), "
                f"not on {backbone.name!r} (fingerprint {actual}): score it with the base model it was trained on"
            )
        try:
            module = cls.from_settings(backbone, settings)
        except (TypeError, ValueError, UserError) as err:
            raise CheckpointError(f"{what} holds latent settings this version cannot build: {err}") from None
        module._fingerprint = actual
        try:
            module.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{what} does not fit this latent: {_first_line(err)}") from None
        return module

    # ------------------------------------------------------------------ the Hugging Face way: a folder

    def save_pretrained(self, directory: str | Path, template: str | None = None) -> Path:
        """Write the latent into ``directory`` (made if needed): ``model.safetensors`` (its
        weights, never the backbone's) and ``config.json`` (its settings, the backbone's spec and
        fingerprint, the template, the format). :meth:`from_pretrained` loads it back.

        Args:
            directory: the folder; files of the same names in it are replaced (each one whole).
            template: the prompt template it was trained with (default: the one it was loaded with, if any).

        Returns:
            The folder.

        Raises:
            ValueError: weights that hold NaN or infinite values (nothing is written).
        """
        from safetensors.torch import save_file

        folder = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"refusing to save the latent into {folder}: non-finite values in {', '.join(bad[:3])}")
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "settings": {k: v for k, v in self.hparams.items() if not str(k).startswith("_")},
            "backbone": self.backbone.spec,
            "fingerprint": self.fingerprint,
            "template": self.template if template is None else template,
        }
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
        folder.mkdir(parents=True, exist_ok=True)
        _replace(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        _replace(folder / CONFIG, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return folder

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, backbone: Backbone | None = None, device: str | torch.device | None = None
    ) -> LatentModel:
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
        config, state = read_pretrained(directory)
        module = cls.from_saved(str(directory), config["backbone"], config["fingerprint"], config["settings"], state, backbone)
        module.template = config["template"]
        return module.to(module.backbone.device if device is None else device).eval()


def read_pretrained(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and the weights of a folder that :meth:`LatentModel.save_pretrained` wrote,
    checked: JSON and safetensors only, nothing unpickled.

    Raises:
        CheckpointError: no such folder, a missing file, a config that is not valid JSON or not of
            this format and version, or weights that safetensors cannot read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    if folder.is_file():
        raise CheckpointError(
            f"{folder} is a file, not a folder written by save_pretrained: "
            "a training checkpoint loads with vtrans.latent.checkpoint.load or Scorer.from_checkpoint"
        )
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder written by save_pretrained: no such folder")
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a latent saved by save_pretrained: it has no {' and no '.join(missing)}"
        )
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {folder / CONFIG}: {_first_line(err)}") from None
    except ValueError as err:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON: {_first_line(err)}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{folder / CONFIG} is not the config of a vtrans latent (no \"format\": \"{FORMAT}\")")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CONFIG} is format version {config.get('format_version')!r}; "
            f"this version of vtrans reads version {FORMAT_VERSION}"
        )
    spec = config.get("backbone")
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or any(not isinstance(spec.get(k, ""), str) for k in (*SPEC_KEYS, "source"))
        or not isinstance(config.get("fingerprint"), str)
        or not isinstance(config.get("settings"), dict)
        or not isinstance(config.get("template"), str | None)
    ):
        raise CheckpointError(f"{folder / CONFIG} is damaged: its backbone spec, fingerprint, settings or template")
    try:
        state = load_file(folder / WEIGHTS, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{folder / WEIGHTS} is not readable safetensors: {_first_line(err)}") from None
    return config, state


def _replace(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: the old
    file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
