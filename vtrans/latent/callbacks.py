"""Training callbacks: resumable random state, a stop at the first non-finite value, a summary of what trains.

* :class:`ResumableRNG` stores the random-number generators' states in every checkpoint and
  puts them back on resume, so that a run resumed from an epoch-end checkpoint draws the same
  z samples as an uninterrupted one.
* :class:`NonFiniteGuard` stops training at the first non-finite weight or gradient of what
  trains, naming the step (the LightningModule checks the loss itself).
* :class:`Summary` is the model summary at the start of training: per module, its parameters,
  how many of them train and its mode, so the frozen backbone reads as frozen.

``train.py`` (``vtrans.cli.train_main``) uses all three (the summary unless
``--trainer.enable_model_summary false``); checkpoints themselves are written and read by
``vtrans.latent.checkpoint``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn

from vtrans.log import log


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


class Summary(ModelSummary):
    """The model summary at the start of training, on the ``vtrans`` logger: what trains and what is frozen.

    Lightning's own summary has no column for trainable parameters, and its FLOPs column and
    total read 0 for a module without an ``example_input_array`` (this one has none: a step of
    the latent is not one forward). This table gives, per module to ``max_depth``, its
    parameters, those that train and its mode; then the totals.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._max_depth and trainer.is_global_zero:
            log.info(summary_table(pl_module, self._max_depth))


def summary_table(module: nn.Module, max_depth: int = 1) -> str:
    """Name, type, parameters, trainable parameters and mode of each submodule down to ``max_depth``
    (-1: all), then the totals. A submodule with both trainable and frozen parameters (the latent
    model, which holds the frozen backbone and the latent) is shown with its children at its own
    depth, so that each level says what trains and what is frozen."""

    def count(m: nn.Module, trainable: bool = False) -> str:
        return get_human_readable_count(sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable))

    shown = list(_rows(module, max_depth))
    cells = [("", "Name", "Type", "Params", "Trainable", "Mode")]
    for i, (name, m) in enumerate(shown):
        cells.append((str(i), name, type(m).__name__, count(m), count(m, trainable=True), "train" if m.training else "eval"))
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    rule = "-" * max(len(line) for line in lines)
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    modes = [m.training for m in module.modules()][1:]  # the module itself left out, as Lightning counts
    totals = [
        (get_human_readable_count(trainable), "Trainable params"),
        (get_human_readable_count(total - trainable), "Frozen params"),
        (get_human_readable_count(total), "Total params"),
        (str(modes.count(True)), "Modules in train mode"),
        (str(modes.count(False)), "Modules in eval mode"),
    ]
    return "\n".join([lines[0], rule, *lines[1:], rule, *(f"{value:<10}{what}" for value, what in totals)])


def _rows(module: nn.Module, max_depth: int, prefix: str = "", depth: int = 0):
    """``(name, submodule)`` in the order of ``named_modules``, down to ``max_depth``; a mixed one
    (trainable and frozen parameters) does not count as a level."""
    for name, child in module.named_children():
        if max_depth >= 0 and depth >= max_depth:
            return
        yield f"{prefix}{name}", child
        mixed = len({p.requires_grad for p in child.parameters()}) == 2
        yield from _rows(child, max_depth, f"{prefix}{name}.", depth if mixed else depth + 1)
