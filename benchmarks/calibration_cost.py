"""What ``p_wrong``'s calibration adds to training: the same epochs with and without the callback, side by side.

Every training run gets ``vtrans.latent.calibrate.Calibrate``, which after each validation
completes the validation idioms (once) and scores them with ``adapter_nll`` under the latent
(every time). This trains the same config, seed and data with and without it, alternating
round by round in one process on one loaded backbone, and reports the ratio of the medians:

    python benchmarks/calibration_cost.py --config configs/smollm2.yaml --epochs 2 --rounds 3

The checkpoints and logs go nowhere (``enable_checkpointing`` and ``logger`` off); nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vtrans.latent import training
from vtrans.latent.calibrate import Calibrate


def _seconds(config: str, epochs: int, backbone, calibrate: bool) -> float:
    overrides = {
        "trainer.max_epochs": epochs, "trainer.logger": False, "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
    }
    built = training.build(config, overrides, backbone=backbone)
    if not calibrate:
        built.trainer.callbacks[:] = [cb for cb in built.trainer.callbacks if not isinstance(cb, Calibrate)]
    start = time.perf_counter()
    training.fit(built)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    backbone = training.build(args.config, {"trainer.logger": False}).module.model.backbone  # loaded once, shared
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for calibrate in (r % 2 == 0, r % 2 != 0):  # alternate which goes first
            times[calibrate].append(_seconds(args.config, args.epochs, backbone, calibrate))
            print(f"round {r}: {'with' if calibrate else 'without'} the calibration {times[calibrate][-1]:.1f} s", flush=True)
    with_, without = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"{args.config}, {args.epochs} epochs, {args.rounds} rounds, {torch.get_num_threads()} threads: "
        f"with {with_:.1f} s, without {without:.1f} s (medians): {with_ / without:.3f}×"
    )


if __name__ == "__main__":
    main()
