"""Training that survives faults: atomic checkpoints, no non-finite tensors, resumable random state.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the same folder,
  flushes and fsyncs it, then ``os.replace``s it over the target: a process killed mid-save
  leaves the previous checkpoint whole. It refuses to write a checkpoint whose weights or
  optimizer state hold NaN or infinite values, and it reads checkpoints back with ``torch.load(weights_only=True)``.
* :class:`ResumableRNG` stores the random-number generators' states in every checkpoint and
  puts them back on resume, so that a run resumed from an epoch-end checkpoint draws the same
  z samples as an uninterrupted one.
* :class:`NonFiniteGuard` stops training at the first non-finite weight or gradient of what
  trains, naming the step (the LightningModule checks the loss itself).

``train.py`` (``vtrans.cli.train_main``) uses all three by default.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

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
            from vtrans.checkpoint import CheckpointError

            raise CheckpointError(f"{path} is not a checkpoint: not the zip archive that torch.save writes")
        if map_location is None:
            map_location = lambda storage, loc: storage  # noqa: E731 (Lightning's default)
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


class ResumableRNG(L.Callback):
    """Saves torch (CPU and CUDA), Python and NumPy random states with each checkpoint; restores them on resume.

    Lightning restores weights, optimizer and loop state but not the generators, so without
    this a resumed run would draw other z samples (and dropout masks) than an uninterrupted one.
    The states are plain tensors and lists, readable with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
        if "python" in state_dict:
            version, internal, gauss = state_dict["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state_dict:
            kind, key, pos, has_gauss, cached = state_dict["numpy"]
            np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state_dict and torch.cuda.is_available():
            states = state_dict["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)


class NonFiniteGuard(L.Callback):
    """Stops training with a ``FloatingPointError`` naming the step at the first NaN or ±inf in a
    trainable weight (checked before each training batch) or gradient (before each optimizer step).

    The module's own check catches a non-finite loss; this one catches what would otherwise
    surface as a distribution's validation error deep inside Pyro, or be written into a checkpoint.
    ``where()`` tells the stage and step last seen, for messages about errors raised elsewhere.
    """

    def __init__(self) -> None:
        self.stage, self.step = "train", None

    def where(self) -> str:
        return f"{self.stage} step {self.step}" if self.step is not None else "the start of training"

    @staticmethod
    def _first_bad(named: Iterator[tuple[str, torch.Tensor | None]]) -> str | None:
        for name, tensor in named:
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                return name
        return None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stage, self.step = "train", trainer.global_step
        bad = self._first_bad((n, p) for n, p in pl_module.named_parameters() if p.requires_grad)
        if bad:
            raise FloatingPointError(
                f"non-finite weights ({bad}) at train step {self.step}: the last update diverged; "
                "lower lr, raise free_bits or check the data"
            )

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self.stage, self.step = "val", trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = self._first_bad((n, p.grad) for n, p in pl_module.named_parameters() if p.requires_grad)
        if bad:
            raise FloatingPointError(
                f"non-finite gradient of {bad} at train step {trainer.global_step}: "
                "lower lr, clip gradients (trainer.gradient_clip_val) or check the data"
            )
