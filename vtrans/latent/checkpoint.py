"""Checkpoints: reading them back safely, and loading the latent they hold.

What a checkpoint holds is the latent only, with a record of its backbone
(``LatentModel.state_dict``, which ``LatentLM`` writes as its own, and ``LatentLM.on_save_checkpoint``): never a copy of the base
model, and ``p_wrong``'s calibration fitted on the validation split (``vtrans.latent.calibrate``), or
why it has none. Writing it during training is ``vtrans.latent.checkpoint_io``'s job (Lightning's plugin).

Reading: a checkpoint must be the zip archive that ``torch.save`` writes (the legacy
pickle-stream format, where ``weights_only`` has had holes, is refused unread), every member
must pass its CRC check (``torch.load`` checks none: a damaged file would load with wrong
weights), and it is read with ``torch.load(weights_only=True)``: tensors and plain containers
only, so a file crafted to run code when unpickled is refused and nothing in it runs. The
checkpoint names its backbone (spec and fingerprint); the backbone is loaded from that spec, or
checked against the one given, and a mismatch is refused with both named. Loading to score
builds the plain :class:`vtrans.latent.model.LatentModel`: no Lightning, torchmetrics or Pyro is
imported. A folder that ``LatentModel.save_pretrained`` wrote (safetensors beside JSON) is read
as the same plain data and loads the same way, wherever a checkpoint is asked for. The resume path (``--ckpt_path``) reads through
``vtrans.latent.checkpoint_io.AtomicCheckpointIO.load_checkpoint``, with the same rules on format and
``weights_only``.

The training callbacks that put state into a checkpoint are in ``vtrans.latent.callbacks``.
"""

from __future__ import annotations

import inspect
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from vtrans.backbone.loading import SPEC_KEYS, Backbone
from vtrans.errors import CheckpointError
from vtrans.latent.model import LatentModel
from vtrans.latent.saved import CALIBRATION, MISSING, calibration_of, first_line, read_pretrained

# --------------------------------------------------------------------------- reading


_UNSAFE = re.compile(r"Unsupported (?:global: GLOBAL \S+|operand \S+|class \S+)|Trying to load unsupported type \S+")


def read(path: str | Path) -> dict:
    """The checkpoint's contents as plain data; never executes code from the file.

    Only the zip format that ``torch.save`` writes is accepted (the legacy pickle-stream format is
    refused before anything in it is read), its members must pass their CRC checks, and the zip's
    pickle is read by ``torch.load(weights_only=True)``, which builds tensors and plain containers only.
    A folder is read as one that ``LatentModel.save_pretrained`` wrote (:func:`read_folder`).

    Raises:
        CheckpointError: a missing, empty, truncated or damaged file; a file that is not a
            checkpoint; one that would build other objects (code) when unpickled; a folder
            that ``save_pretrained`` did not write.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if not is_zip:
        raise CheckpointError(
            f"{path} is not a checkpoint: not the zip archive that torch.save writes (empty, truncated or another format)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # CRC of every member: torch.load does not check them
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (damaged zip archive): {first_line(err)}") from None
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: {damaged} fails its CRC check (a partial copy or a bad disk?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _UNSAFE.search(str(err))
        if unsafe or "Weights only load failed" in str(err):
            what = unsafe.group(0) if unsafe else "objects other than tensors and plain data"
            raise CheckpointError(
                f"{path} was refused: loading it would build {what}, which can run code; nothing from it was run"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (damaged): {first_line(err)}") from None
    except Exception as err:  # torch raises many kinds on a damaged archive (RuntimeError, KeyError, EOFError, ...)
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or damaged): {type(err).__name__}: {first_line(err)}"
        ) from None
    if not isinstance(ckpt, dict) or "vtrans" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a vtrans checkpoint (no 'vtrans' record): train one with train.py fit")
    record, state = ckpt["vtrans"], ckpt["state_dict"]
    spec = record.get("backbone") if isinstance(record, dict) else None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or any(not isinstance(spec.get(k, ""), str) for k in (*SPEC_KEYS, "source"))
        or not isinstance(record.get("fingerprint"), str)
        or not isinstance(state, dict)
        or not isinstance(ckpt.get("hyper_parameters", {}), dict)
    ):
        raise CheckpointError(f"{path} has a damaged 'vtrans' record (backbone spec, fingerprint or weights)")
    return ckpt


def read_folder(path: str | Path) -> dict:
    """A folder that ``LatentModel.save_pretrained`` wrote, as the plain data :func:`read` gives
    of a checkpoint: the record, the weights, the settings and the template (its split and its
    training idioms it does not record)."""
    config, state = read_pretrained(path)
    contents = {
        "vtrans": {"backbone": config["backbone"], "fingerprint": config["fingerprint"], "format": config["format_version"]},
        "state_dict": state,
        "hyper_parameters": config["settings"],
    }
    if config["template"] is not None:
        contents["datamodule_hyper_parameters"] = {"template": config["template"]}
    contents.update({k: config[k] for k in (CALIBRATION, MISSING) if k in config})
    return contents


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    backbone: Backbone | None = None,
    training: bool = False,
    ckpt: dict | None = None,
) -> LatentModel:
    """The checkpoint's latent, on ``device``, in eval mode: a ``LatentModel`` to score with,
    or with ``training`` the ``LatentLM`` that goes on training it (holding that ``LatentModel``).

    Args:
        path: a checkpoint written by ``train.py fit``, or a folder written by
            ``LatentModel.save_pretrained``.
        device: where to put the model.
        backbone: the base model to use; default: load the one the checkpoint names (one that
            was a model in memory must be given). Either way its fingerprint must equal the
            checkpoint's.
        training: build the LightningModule (``vtrans.latent.module.LatentLM``), which checks the
            training settings too; without it those are kept in ``settings`` unread.
        ckpt: the file's contents, where :func:`read` has read them already.

    Raises:
        CheckpointError: see :func:`read`; a checkpoint of another base model (both named), or
            of a model in memory not given; settings or weights that do not build this
            version's latent (``LatentModel.from_saved``).
    """
    ckpt = read(path) if ckpt is None else ckpt
    record = ckpt["vtrans"]
    model = LatentModel.from_saved(str(path), record["backbone"], record["fingerprint"], hyper_parameters(ckpt), ckpt["state_dict"], backbone)
    model.template = template_in(ckpt)
    model.calibration, model.calibration_missing = calibration_of(ckpt, str(path))
    if training:
        from vtrans.latent.module import LatentLM

        return LatentLM.from_model(model).to(device).eval()
    return model.to(device).eval()


def hyper_parameters(ckpt: dict) -> dict:
    """The latent's settings a checkpoint's contents (:func:`read`) record."""
    return {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not str(k).startswith("_")}


def prior_in(ckpt: dict) -> str:
    """The prior of the latent in a checkpoint's contents (:func:`read`): ``standard`` or ``conditional``."""
    return hyper_parameters(ckpt).get("prior", inspect.signature(LatentModel).parameters["prior"].default)


def template_in(ckpt: dict) -> str | None:
    """The prompt template recorded in a checkpoint's contents (:func:`read`), if any."""
    template = ckpt.get("datamodule_hyper_parameters", {}).get("template")
    return template if isinstance(template, str) else None


SPLIT_KEYS = ("seed", "val_fraction", "test_fraction")


def trained_idiom_hashes(ckpt: dict) -> set[str] | None:
    """The idioms the latent of a checkpoint's contents (:func:`read`) was trained on, as
    ``vtrans.data.idiom_hash`` values.

    Returns:
        The set of hashes; None for a checkpoint written before they were recorded.
    """
    from vtrans.latent.datamodule import IdiomDataModule

    state = ckpt.get(IdiomDataModule.__qualname__)
    hashes = state.get("train_idiom_hashes") if isinstance(state, dict) else None
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        return None
    return set(hashes)


def split_settings(ckpt: dict) -> dict:
    """The data settings the latent of a checkpoint's contents (:func:`read`) was trained with:
    ``data`` and the split's ``seed``, ``val_fraction`` and ``test_fraction``, those it records."""
    hparams = ckpt.get("datamodule_hyper_parameters", {})
    return {k: hparams[k] for k in ("data", *SPLIT_KEYS) if k in hparams}
