"""Writing checkpoints during training: Lightning's checkpoint plugin, atomic and refusing non-finite values.

``train.py`` uses :class:`AtomicCheckpointIO` by default (``trainer.plugins``): a checkpoint is
written to a temporary file in the same folder, flushed and fsynced, then ``os.replace``d over
the target, so a process killed mid-save leaves the previous checkpoint whole. A checkpoint
whose weights or optimizer state hold NaN or infinite values is refused. The resume path
(``--ckpt_path``) reads through :meth:`AtomicCheckpointIO.load_checkpoint`, with the rules of
``vtrans.latent.checkpoint`` on format and ``weights_only``. Reading a checkpoint to score it needs
none of this (nor Lightning): see ``vtrans.latent.checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vtrans.errors import CheckpointError

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
