"""The calibration a checkpoint carries, fitted during training on the validation split.

:class:`Calibrate` is a Lightning callback that every training run gets
(``vtrans.latent.training.trainer_defaults``). After every validation it completes the
validation idioms' prompts with the base model (greedily, as ``vtrans evaluate`` does, the
latent off), labels each completion, scores it with ``adapter_nll``
(:meth:`vtrans.latent.model.LatentModel.nll_at_mean`, the latent as it now is) and fits
``p_wrong``'s map (``vtrans.latent.calibration.fit``: Platt or isotonic, chosen on those items).
Every checkpoint written at that step carries it under ``"calibration"``; one written at
another step (a train-epoch-end save between validations), or whose validation split is too
small or of one class, says why under ``"calibration_missing"``.

The completions are the base model's, so they and their labels are made once, at the first
validation; each later one reruns only the latent's pass. The modules' train/eval modes are
restored after each fit. Under ``limit_val_batches`` it calibrates on the batches validated.
"""

from __future__ import annotations

import math
import time

import lightning as L
import numpy as np
import torch

from vtrans import log
from vtrans.backbone.generate import complete, is_correct
from vtrans.config import EstimatorConfig
from vtrans.data import idiom_hash, render_prompt
from vtrans.latent.calibration import RECOMMENDED, Calibration, fit
from vtrans.latent.saved import CALIBRATION, MISSING


def _validated(trainer: L.Trainer, items: list | None) -> list | None:
    """The validation items the validation loop reads: all of them, or the first batches that
    ``limit_val_batches`` keeps (a quick run calibrates on what it validates on)."""
    if not items:
        return items
    batches = trainer.num_val_batches
    count = batches[0] if isinstance(batches, list) and batches else batches
    batch_size = getattr(getattr(trainer.datamodule, "hparams", None), "batch_size", None)
    if isinstance(count, int | float) and math.isfinite(count) and batch_size:
        return items[: int(count) * int(batch_size)]
    return items


class Calibrate(L.Callback):
    """Fit ``p_wrong``'s map on the validation split after each validation; save it in the checkpoints of that step."""

    def __init__(self, batch_size: int = 32) -> None:
        self.batch_size = batch_size
        self.fitted: Calibration | str | None = None  # the map, or why there is none
        self.step = -1
        self._labelled: tuple[list[str], list[int], np.ndarray] | None = None  # prompts, ŷ, wrong

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.step = trainer.global_step
        datamodule = trainer.datamodule
        items = _validated(trainer, getattr(datamodule, "items", {}).get("val") if datamodule is not None else None)
        if not items:
            self.fitted = "the run had no validation split of idioms to fit it on"
            return
        modes = {name: m.training for name, m in pl_module.named_modules()}
        start = time.perf_counter()
        pl_module.eval()
        try:
            with torch.no_grad():
                self.fitted = self._fit(pl_module.model, items, datamodule.hparams.template, getattr(datamodule, "answer_words", 1))
        finally:
            for name, m in pl_module.named_modules():
                m.train(modes.get(name, m.training))
        if isinstance(self.fitted, Calibration):
            log.log.info(f"calibration at step {self.step}: {self.fitted.describe()} ({time.perf_counter() - start:.1f} s)")

    def _fit(self, model, items: list, template: str, answer_words: int = 1) -> Calibration | str:
        if self._labelled is None:
            prompts = [render_prompt(template, it.prefix) for it in items]
            config = EstimatorConfig()
            completions = complete(
                model.backbone.model,
                model.tokenizer,
                prompts,
                max_new_tokens=config.max_new_tokens,
                batch_size=self.batch_size,
                answer_words=answer_words,
            )
            wrong = np.array([not is_correct(c, it.target, answer_words) for c, it in zip(completions, items, strict=True)])
            self._labelled = (prompts, [c.first_token for c in completions], wrong)
        prompts, first, wrong = self._labelled
        scores = torch.cat(
            [model.nll_at_mean(prompts[i : i + self.batch_size], first[i : i + self.batch_size]).cpu()
             for i in range(0, len(prompts), self.batch_size)]
        )
        hashes = [idiom_hash(it.idiom) for it in items]
        where = f"validation split ({len(items)} idioms)"
        return fit(scores.double().numpy(), wrong.astype(np.float64), RECOMMENDED, where, self.step, hashes, answer_words)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.step != trainer.global_step or self.fitted is None:
            checkpoint[MISSING] = "no validation ran at the step this checkpoint was written"
        elif isinstance(self.fitted, Calibration):
            checkpoint[CALIBRATION] = self.fitted.to_dict()
        else:
            checkpoint[MISSING] = self.fitted
