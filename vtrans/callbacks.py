"""Training callbacks: resumable random state and a stop at the first non-finite value.

* :class:`ResumableRNG` stores the random-number generators' states in every checkpoint and
  puts them back on resume, so that a run resumed from an epoch-end checkpoint draws the same
  z samples as an uninterrupted one.
* :class:`NonFiniteGuard` stops training at the first non-finite weight or gradient of what
  trains, naming the step (the LightningModule checks the loss itself).

``train.py`` (``vtrans.cli.train_main``) uses both, always; checkpoints themselves are written
and read by ``vtrans.checkpoint``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch


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
