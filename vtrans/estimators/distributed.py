"""Scoring and evaluation over several processes, with ``torch.distributed``.

The work is cut into the same batches as in one process, and batch ``b`` runs on rank
``b % world``. Every random draw of the runner is seeded by item or batch index
(``vtrans.estimators.runner``), so a batch gives the same numbers on whichever rank runs it; the ranks then
exchange their batches' results (``all_gather_object``) and each puts them back in input order.
The records are those of one process.

Two ways in:

* ``--devices N`` on ``vtrans evaluate`` and ``vtrans score``: :func:`launch` starts N processes
  (gloo on CPUs, NCCL with one GPU each) and runs the command in each; rank 0 writes the output.
* ``torchrun --nproc_per_node N $(which vtrans) score ...``: the process group is set up from
  the environment torchrun provides (:func:`from_environment`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    def mine(self, batch: int) -> bool:
        """Whether batch number ``batch`` runs here."""
        return batch % self.world == self.rank

    def batches(self, n: int, size: int) -> Iterator[tuple[int, slice]]:
        """``(batch number, items)`` of this rank's batches when ``n`` items are cut into batches of ``size``."""
        for b, first in enumerate(range(0, n, size)):
            if self.mine(b):
                yield b, slice(first, min(first + size, n))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def merge(self, parts: dict[int, Any]) -> list[Any]:
        """Every rank's ``{batch: result}``, as one list in batch order."""
        merged: dict[int, Any] = {}
        for got in self.gather(parts):
            merged.update(got)
        return [merged[b] for b in sorted(merged)]


def current() -> Shard:
    """The running process group's shard (one process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def from_environment() -> Shard:
    """Join the process group that a launcher (torchrun, :func:`launch`) describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("VTRANS_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return current()


def rank_device(device: str, shard: Shard) -> str:
    """The device of this rank: its own GPU (``cuda:rank``) when the run is on CUDA, else ``device``."""
    if shard.world > 1 and device.startswith("cuda"):
        return f"cuda:{shard.rank % torch.cuda.device_count()}"
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple) -> None:
    """One rank: join the group, run ``fn``, leave the group, and end the process with ``fn``'s exit code.

    A rank that finished (or left by ``SystemExit``, a user error) ends with ``os._exit`` once its
    streams are flushed, as a forked ``multiprocessing`` child does: the interpreter's teardown
    would otherwise race the group's C++ threads, and now and then abort (SIGABRT) a run whose
    work and output were complete. Any other exception propagates, so that ``torch.multiprocessing``
    reports its traceback.
    """
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    )
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(*args)
        code = 0
        dist.barrier()  # every rank is done with every exchange before any leaves the group
    except SystemExit as stop:
        code = _exit_code(stop)
    finally:
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _exit_code(stop: SystemExit) -> int:
    """The process exit code ``SystemExit`` stands for (its message, if any, goes to stderr)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def launch(fn: Callable, devices: int, device: str, *args: Any) -> None:
    """Run ``fn(*args)`` in ``devices`` new processes joined in a process group (gloo on CPUs, NCCL on GPUs).

    ``fn`` and ``args`` must be picklable (a module-level function). An error in any process
    ends the run with that error.
    """
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        mp.start_processes(
            _worker, args=(devices, _free_port(), backend, fn, args), nprocs=devices, join=True, start_method="spawn"
        )
    except mp.ProcessExitedException as err:  # a rank ended with an exit code (its message is on stderr)
        raise SystemExit(err.exit_code) from None
