"""Test-only Lightning callbacks that inject faults into a ``train.py fit`` subprocess.

Used with ``--trainer.callbacks+=helpers_kill.KillAtStep`` (``tests/`` on PYTHONPATH):

* :class:`KillAtStep` sends SIGKILL to its own process when a training batch starts at a
  given global step: an abrupt death, no cleanup, no exception handling;
* :class:`NaNAtStep` sets a latent weight to NaN at a given global step;
* :class:`NaNActivationsAtStep` makes the latent's encoder output NaN from a given global step
  on (the weights stay finite: the NaN appears in the forward only);
* :class:`KillInRun` sends SIGKILL at a step of the N-th training run of a process that trains
  several (``vtrans crossval``), when the environment asks for it: a training YAML that names it
  trains normally everywhere else.
"""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class KillAtStep(L.Callback):
    """SIGKILL this process at the start of the training batch of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNAtStep(L.Callback):
    """Fill the latent's projection z -> residual stream with NaN at global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.latent.proj.weight.fill_(float("nan"))


class NaNActivationsAtStep(L.Callback):
    """From global step ``step`` on, the posterior encoder's location comes out NaN (a forward hook)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.model.latent.posterior_head.register_forward_hook(lambda m, args, out: (out[0] * float("nan"), out[1]))


class KillInRun(L.Callback):
    """SIGKILL this process at global step ``step`` of its ``run``-th training run (counted from 1),
    where the environment variable ``VTRANS_KILL_IN_RUN`` is ``"run:step"``; without it, nothing."""

    runs = 0  # training runs started in this process, by every instance

    def on_fit_start(self, trainer, pl_module) -> None:
        type(self).runs += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        wanted = os.environ.get("VTRANS_KILL_IN_RUN")
        if wanted and tuple(map(int, wanted.split(":"))) == (type(self).runs, trainer.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
