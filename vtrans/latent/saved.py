"""The formats a latent is saved in, and the checks that rebuild one from them.

Two formats hold a latent: the checkpoints that training writes (``vtrans.latent.checkpoint``), and
the folder that :meth:`vtrans.latent.model.LatentModel.save_pretrained` writes the way the Hugging
Face ecosystem expects: ``model.safetensors`` (the latent's weights, never the backbone's) beside
``config.json`` (its settings, the backbone's spec and fingerprint, the template it was trained
with, the format). Neither is ever unpickled. Both are rebuilt by
:meth:`~vtrans.latent.model.LatentModel.from_saved`, on the backbone :func:`backbone_of` gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vtrans.backbone.loading import MEMORY, SPEC_KEYS, Backbone
from vtrans.errors import CheckpointError
from vtrans.latent.calibration import Calibration

TRAINING_KEYS = ("beta", "kl_warmup_steps", "free_bits", "elbo", "num_particles", "lr", "weight_decay", "cache_frozen")
"""The latent settings that only training reads: ``LatentLM``'s arguments beyond ``LatentModel``'s
(named here so that scoring rebuilds a latent without importing Lightning). A latent loaded to
score keeps them in ``settings``, unread."""
CALIBRATION, MISSING = "calibration", "calibration_missing"  # where both formats keep p_wrong's map, or why there is none
NEVER_CALIBRATED = "it was saved without a calibration (by a run without the Calibrate callback, or before vtrans fitted one)"
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the files of a folder written by save_pretrained
FORMAT, FORMAT_VERSION = "vtrans-latent", 1


def backbone_of(what: str, spec: dict, fingerprint: str, backbone: Backbone | None = None) -> Backbone:
    """The base model a saved latent was trained on: ``backbone`` or the one ``spec`` names,
    its fingerprint checked against the saved one.

    Raises:
        CheckpointError: a model that was in memory and is not given; a backbone of another
            fingerprint (both named).
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
    return backbone


def calibration_record(calibration: Calibration | None, missing: str | None) -> dict:
    """What a saved latent records of its calibration: the map, or why it has none."""
    return {CALIBRATION: calibration.to_dict()} if calibration is not None else {MISSING: missing or NEVER_CALIBRATED}


def calibration_of(contents: dict, what: str) -> tuple[Calibration | None, str | None]:
    """The calibration a checkpoint's or folder's contents hold, or None and why there is none.

    Raises:
        CheckpointError: a calibration record that is not one ``Calibration.to_dict`` wrote.
    """
    record = contents.get(CALIBRATION)
    if record is None:
        missing = contents.get(MISSING)
        return None, missing if isinstance(missing, str) else NEVER_CALIBRATED
    try:
        return Calibration.from_dict(record), None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{what} holds a damaged calibration: {err}") from None


def write_pretrained(directory: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """``state`` as ``model.safetensors`` and ``config`` (with the format added) as ``config.json``
    in ``directory`` (made if needed), each file replaced whole; returns the folder.

    Raises:
        ValueError: weights that hold NaN or infinite values (nothing is written).
    """
    from safetensors.torch import save_file

    folder = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"refusing to save the latent into {folder}: non-finite values in {', '.join(bad[:3])}")
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config}, indent=2, sort_keys=True, allow_nan=False)
    folder.mkdir(parents=True, exist_ok=True)
    _replace(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    _replace(folder / CONFIG, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return folder


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
        raise CheckpointError(f"cannot read {folder / CONFIG}: {first_line(err)}") from None
    except ValueError as err:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON: {first_line(err)}") from None
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
        raise CheckpointError(f"{folder / WEIGHTS} is not readable safetensors: {first_line(err)}") from None
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


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
