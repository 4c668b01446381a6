"""What a latent saves, and the one way it is rebuilt from what was saved.

A latent is rebuilt from what was saved in one place (:meth:`SavedLatent.from_saved`): the
backbone it names, checked by fingerprint, its settings and its weights. Two formats hold
those: the checkpoints that training writes (``vtrans.latent.checkpoint``), and the folder that
:meth:`Pretrained.save_pretrained` writes the way the Hugging Face ecosystem expects:
``model.safetensors`` (the latent's weights, never the backbone's) beside ``config.json`` (its
settings, the backbone's spec and fingerprint, the template it was trained with, the format).
Neither is ever unpickled.

:class:`vtrans.latent.model.LatentModel` is a :class:`Pretrained` (and so a :class:`SavedLatent`):
what these read of it is its ``backbone``, ``hparams``, ``template`` and ``_fingerprint``, and the
weights of its modules.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Self

import torch

from vtrans.backbone.loading import MEMORY, SPEC_KEYS, Backbone
from vtrans.errors import CheckpointError, UserError

TRAINING_KEYS = ("beta", "kl_warmup_steps", "free_bits", "elbo", "num_particles", "lr", "weight_decay", "cache_frozen")
"""The latent settings that only training reads: ``LatentLM``'s arguments beyond ``LatentModel``'s
(named here so that scoring rebuilds a latent without importing Lightning). A latent loaded to
score keeps them in ``hparams``, unread."""
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the files of a folder written by save_pretrained
FORMAT, FORMAT_VERSION = "vtrans-latent", 1


class SavedLatent:
    """The weights a checkpoint holds (the latent's only, never the backbone's), the backbone's
    fingerprint, and a latent rebuilt from recorded settings and weights."""

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
    def from_settings(cls, backbone: Backbone, settings: dict) -> Self:
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
    ) -> Self:
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


class Pretrained(SavedLatent):
    """The Hugging Face way: the latent saved into a folder and loaded back from it."""

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
