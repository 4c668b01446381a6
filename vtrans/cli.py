"""Command lines: ``python train.py`` (LightningCLI) and ``vtrans evaluate|score``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from vtrans.errors import UserError


def fail(message: str) -> None:
    """One clear line on stderr and exit code 2: the contract for errors a user can cause."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def guarded(fn: Callable[[], object]) -> object:
    """Run a command, turning user errors (bad files, settings, models) into exit code 2."""
    try:
        return fn()
    except UserError as err:
        fail(str(err))
    except FileNotFoundError as err:
        fail(f"file not found: {err.filename or err}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def train_main(args: list[str] | None = None) -> None:
    """``python train.py fit|validate|test --config configs/NAME.yaml``."""
    from lightning.pytorch.cli import LightningCLI

    from vtrans.data import IdiomDataModule
    from vtrans.module import LatentLM

    guarded(
        lambda: LightningCLI(
            LatentLM,
            IdiomDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    )


def main(argv: list[str] | None = None) -> None:
    """``vtrans evaluate|score``."""
    from vtrans.commands import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    guarded(lambda: args.run(args))
