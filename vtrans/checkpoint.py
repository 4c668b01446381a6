"""Checkpoints: reading them back safely, and loading the latent they hold.

What a checkpoint holds is the latent only, with a record of its backbone
(``LatentModel.state_dict`` and ``LatentLM.on_save_checkpoint``): never a copy of the base
model. Writing it during training is ``vtrans.checkpoint_io``'s job (Lightning's plugin).

Reading: a checkpoint must be the zip archive that ``torch.save`` writes (the legacy
pickle-stream format, where ``weights_only`` has had holes, is refused unread), every member
must pass its CRC check (``torch.load`` checks none: a damaged file would load with wrong
weights), and it is read with ``torch.load(weights_only=True)``: tensors and plain containers
only, so a file crafted to run code when unpickled is refused and nothing in it runs. The
checkpoint names its backbone (spec and fingerprint); the backbone is loaded from that spec, or
checked against the one given, and a mismatch is refused with both named. Loading to score
builds the plain :class:`vtrans.model.LatentModel`: no Lightning, torchmetrics or Pyro is
imported. The resume path (``--ckpt_path``) reads through
``vtrans.checkpoint_io.AtomicCheckpointIO.load_checkpoint``, with the same rules on format and
``weights_only``.

The training callbacks that put state into a checkpoint are in ``vtrans.callbacks``.
"""

from __future__ import annotations

import inspect
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from vtrans.errors import CheckpointError, UserError
from vtrans.loading import Backbone
from vtrans.model import LatentModel

# --------------------------------------------------------------------------- reading


_UNSAFE = re.compile(r"Unsupported (?:global: GLOBAL \S+|operand \S+|class \S+)|Trying to load unsupported type \S+")
BACKBONE_KEYS = ("name", "dtype", "attn_implementation")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read(path: str | Path) -> dict:
    """The checkpoint's contents as plain data; never executes code from the file.

    Only the zip format that ``torch.save`` writes is accepted (the legacy pickle-stream format is
    refused before anything in it is read), its members must pass their CRC checks, and the zip's
    pickle is read by ``torch.load(weights_only=True)``, which builds tensors and plain containers only.

    Raises:
        CheckpointError: a missing, empty, truncated or damaged file; a file that is not a
            checkpoint; one that would build other objects (code) when unpickled.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
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
        raise CheckpointError(f"{path} is not a readable checkpoint (damaged zip archive): {_first_line(err)}") from None
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
        raise CheckpointError(f"{path} is not a readable checkpoint (damaged): {_first_line(err)}") from None
    except Exception as err:  # torch raises many kinds on a damaged archive (RuntimeError, KeyError, EOFError, ...)
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or damaged): {type(err).__name__}: {_first_line(err)}"
        ) from None
    if not isinstance(ckpt, dict) or "vtrans" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a vtrans checkpoint (no 'vtrans' record): train one with train.py fit")
    record, state = ckpt["vtrans"], ckpt["state_dict"]
    spec = record.get("backbone") if isinstance(record, dict) else None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or any(not isinstance(spec.get(k, ""), str) for k in BACKBONE_KEYS)
        or not isinstance(record.get("fingerprint"), str)
        or not isinstance(state, dict)
        or not isinstance(ckpt.get("hyper_parameters", {}), dict)
    ):
        raise CheckpointError(f"{path} has a damaged 'vtrans' record (backbone spec, fingerprint or weights)")
    return ckpt


TRAINING_KEYS = ("beta", "kl_warmup_steps", "free_bits", "elbo", "num_particles", "lr", "weight_decay", "cache_frozen")
"""The latent settings a checkpoint records that only training reads: ``LatentLM``'s arguments
beyond ``LatentModel``'s (named here so that scoring reads a checkpoint without importing Lightning)."""


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    backbone: Backbone | None = None,
    training: bool = False,
    ckpt: dict | None = None,
) -> LatentModel:
    """The checkpoint's latent, on ``device``, in eval mode: a ``LatentModel`` to score with,
    or with ``training`` the ``LatentLM`` that trains it.

    Args:
        path: a checkpoint written by ``train.py fit``.
        device: where to put the model.
        backbone: the base model to use; default: load the one the checkpoint names. Either
            way its fingerprint must equal the checkpoint's.
        training: build the LightningModule (``vtrans.module.LatentLM``), which checks the
            training settings too; without it those are kept in ``hparams`` unread.
        ckpt: the file's contents, where :func:`read` has read them already.

    Raises:
        CheckpointError: see :func:`read`; a checkpoint of another base model (both named);
            settings or weights that do not build this version's latent.
    """
    ckpt = read(path) if ckpt is None else ckpt
    record = ckpt["vtrans"]
    spec = {k: record["backbone"][k] for k in BACKBONE_KEYS if k in record["backbone"]}
    if backbone is None:
        backbone = Backbone(**spec)
    expected, actual = record["fingerprint"], backbone.fingerprint()
    if expected != actual:
        raise CheckpointError(
            f"{path} was trained on backbone {spec['name']!r} (fingerprint {expected}), "
            f"not on {backbone.name!r} (fingerprint {actual}): score it with the base model it was trained on"
        )
    hparams = hyper_parameters(ckpt)
    try:
        if training:
            from vtrans.module import LatentLM

            module = LatentLM(backbone, **hparams)
        else:
            module = _latent_model(backbone, hparams)
    except (TypeError, ValueError, UserError) as err:
        raise CheckpointError(f"{path} holds latent settings this version cannot build: {err}") from None
    module._fingerprint = actual
    try:
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} does not fit this latent: {_first_line(err)}") from None
    return module.to(device).eval()


def _latent_model(backbone: Backbone, hparams: dict) -> LatentModel:
    """A ``LatentModel`` from a checkpoint's settings; ``hparams`` keeps the training ones too, for the record."""
    own = set(inspect.signature(LatentModel).parameters) - {"backbone"}
    unknown = sorted(set(hparams) - own - set(TRAINING_KEYS))
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}")
    module = LatentModel(backbone, **{k: v for k, v in hparams.items() if k in own})
    module.hparams.update(hparams)
    return module


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


def template_of(path: str | Path) -> str | None:
    """The prompt template the latent was trained with, if the checkpoint records one."""
    return template_in(read(path))


SPLIT_KEYS = ("seed", "val_fraction", "test_fraction")


def trained_idiom_hashes(path: str | Path) -> set[str] | None:
    """The idioms the checkpoint's latent was trained on, as ``vtrans.data.idiom_hash`` values.

    Returns:
        The set of hashes; None for a checkpoint written before they were recorded.
    """
    from vtrans.datamodule import IdiomDataModule

    state = read(path).get(IdiomDataModule.__qualname__)
    hashes = state.get("train_idiom_hashes") if isinstance(state, dict) else None
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        return None
    return set(hashes)


def split_settings(path: str | Path) -> dict:
    """The data settings the latent was trained with: ``data`` and the split's ``seed``,
    ``val_fraction`` and ``test_fraction``, those the checkpoint records (none for an older one)."""
    hparams = read(path).get("datamodule_hyper_parameters", {})
    return {k: hparams[k] for k in ("data", *SPLIT_KEYS) if k in hparams}


def __getattr__(name: str):
    """``vtrans.checkpoint.AtomicCheckpointIO``, the ``class_path`` that training configs written
    before it moved to ``vtrans.checkpoint_io`` name (imported on use: it needs Lightning)."""
    if name == "AtomicCheckpointIO":
        from vtrans.checkpoint_io import AtomicCheckpointIO

        return AtomicCheckpointIO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
