"""Checkpoints: writing them during training, reading them back safely.

Writing (``train.py`` uses :class:`AtomicCheckpointIO` by default, ``trainer.plugins``): a
checkpoint is written to a temporary file in the same folder, flushed and fsynced, then
``os.replace``d over the target, so a process killed mid-save leaves the previous checkpoint
whole. A checkpoint whose weights or optimizer state hold NaN or infinite values is refused.
What is written is the latent only, with a record of its backbone (``LatentLM.state_dict`` and
``on_save_checkpoint``): never a copy of the base model.

Reading: a checkpoint must be the zip archive that ``torch.save`` writes (the legacy
pickle-stream format, where ``weights_only`` has had holes, is refused unread), every member
must pass its CRC check (``torch.load`` checks none: a damaged file would load with wrong
weights), and it is read with ``torch.load(weights_only=True)``: tensors and plain containers
only, so a file crafted to run code when unpickled is refused and nothing in it runs. The
checkpoint names its backbone (spec and fingerprint); the backbone is loaded from that spec, or
checked against the one given, and a mismatch is refused with both named. The resume path
(``--ckpt_path``) reads through :meth:`AtomicCheckpointIO.load_checkpoint`, with the same rules
on format and ``weights_only``.

The training callbacks that put state into a checkpoint are in ``vtrans.callbacks``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vtrans.errors import UserError
from vtrans.loading import Backbone


class CheckpointError(UserError):
    """A file that is missing, truncated, unsafe, or not a vtrans checkpoint."""


# --------------------------------------------------------------------------- writing


CHECKED = ("state_dict", "optimizer_states")  # what training computes (callbacks may hold inf legitimately)


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint about to be written holds NaN or infinite values."""


def non_finite_tensors(obj: Any, prefix: str = "") -> Iterator[str]:
    """The names of the floating-point tensors in a nested checkpoint that hold NaN or ±inf."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            yield prefix or "<tensor>"
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from non_finite_tensors(value, f"{prefix}[{i}]")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, fsync, then ``os.replace``.

    A failure or a kill at any point before the replace leaves the previous file at ``path``
    untouched (and at most a hidden ``.NAME.*.tmp`` file behind after a kill). Remote paths
    (``s3://`` and other fsspec URLs) fall back to Lightning's own transactional write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Raises:
            NonFiniteCheckpointError: when a tensor of the weights (``state_dict``) or of the
                optimizer state holds NaN or ±inf (nothing is written).
            TypeError: when ``storage_options`` is given (not supported).
        """
        bad = [name for key in CHECKED for name in non_finite_tensors(checkpoint.get(key), key)]
        if bad:
            step = checkpoint.get("global_step", "?")
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {path} at step {step}: non-finite values in {', '.join(bad[:3])}"
                + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            )
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint with ``weights_only=True`` unless the caller asks otherwise explicitly.

        A local file must be the zip archive ``torch.save`` writes: the legacy pickle-stream
        format is refused before anything in it is read.
        """
        if "://" not in str(path) and Path(path).is_file() and not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is not a checkpoint: not the zip archive that torch.save writes")
        if map_location is None:
            map_location = lambda storage, loc: storage  # noqa: E731 (Lightning's default)
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


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


def load(path: str | Path, device: str | torch.device = "cpu", backbone: Backbone | None = None):
    """A ``LatentLM`` with the checkpoint's latent weights, on ``device``, in eval mode.

    Args:
        path: a checkpoint written by ``train.py fit``.
        device: where to put the model.
        backbone: the base model to use; default: load the one the checkpoint names. Either
            way its fingerprint must equal the checkpoint's.

    Raises:
        CheckpointError: see :func:`read`; a checkpoint of another base model (both named);
            settings or weights that do not build this version's latent.
    """
    from vtrans.module import LatentLM

    ckpt = read(path)
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
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not str(k).startswith("_")}
    try:
        module = LatentLM(backbone, **hparams)
    except (TypeError, ValueError, UserError) as err:
        raise CheckpointError(f"{path} holds latent settings this version cannot build: {err}") from None
    module._fingerprint = actual
    try:
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} does not fit this latent: {_first_line(err)}") from None
    return module.to(device).eval()


def template_of(path: str | Path) -> str | None:
    """The prompt template the latent was trained with, if the checkpoint records one."""
    return read(path).get("datamodule_hyper_parameters", {}).get("template")


SPLIT_KEYS = ("seed", "val_fraction", "test_fraction")


def trained_idiom_hashes(path: str | Path) -> set[str] | None:
    """The idioms the checkpoint's latent was trained on, as ``vtrans.data.idiom_hash`` values.

    Returns:
        The set of hashes; None for a checkpoint written before they were recorded.
    """
    from vtrans.data import IdiomDataModule

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
