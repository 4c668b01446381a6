"""The entry points: ``python train.py`` (LightningCLI) and ``vtrans``, its subcommands and their parsers.

Each ``vtrans`` subcommand is built with jsonargparse from typed signatures, as ``train.py`` is
with LightningCLI: the command function's own parameters (``--out``, ``--ckpt``, ``--device``,
``--quiet``, ...) and the fields of its settings dataclasses (:class:`vtrans.config.EstimatorConfig`,
:class:`vtrans.config.EvalConfig`, :class:`vtrans.config.CrossvalConfig`) become top-level
options with the types, defaults and docstrings written there, once. So every subcommand takes
``--config FILE.yaml`` and ``--print_config``, and an option given after ``--config`` overrides
the file. The dataclasses check their values: one out of range is one line on stderr and exit
code 2, like every other error a user can cause.
"""

from __future__ import annotations

import inspect
import sys
from argparse import SUPPRESS
from collections.abc import Callable
from dataclasses import dataclass

import docstring_parser
from jsonargparse import ArgumentParser, Namespace

from vtrans import log
from vtrans.cli.commands import (
    crossval_command,
    estimators_command,
    evaluate_command,
    guarded,
    score_command,
)
from vtrans.cli.parsing import Fields, Parser, command_parser, described


def train_main(args: list[str] | None = None, run: bool = True):
    """``python train.py fit|validate|test --config configs/NAME.yaml``.

    Built by :class:`vtrans.latent.training.TrainingCLI`, as every training run is. Checkpoints are
    written atomically and refuse non-finite tensors (``AtomicCheckpointIO``, the default
    ``trainer.plugins``), and they carry the random states so that ``--ckpt_path`` resumes an
    epoch exactly (``ResumableRNG``, always on). A non-finite loss, weight or gradient (``NonFiniteGuard``, always on) ends the run with one line on stderr naming the
    step and exit code 1. A setting out of range (the data's, the latent's, the backbone's or the
    trainer's) ends it with one line on stderr and exit code 2. With ``run=False`` the configured
    ``LightningCLI`` is returned without running a subcommand (``args`` then holds no subcommand).
    """
    from vtrans.latent.callbacks import NonFiniteGuard
    from vtrans.latent.training import TrainingCLI, stopping

    log.setup(quiet=False)
    guard = NonFiniteGuard()

    def build():
        with stopping(guard):
            return TrainingCLI(args=args, run=run, guard=guard)

    return guarded(build)


EVALUATE = Fields("vtrans.config.EvalConfig", "Data, estimator and report settings", frozenset({"template"}))
SCORE = Fields("vtrans.config.EstimatorConfig", "Estimator settings")
CROSSVAL = Fields(
    "vtrans.config.CrossvalConfig",
    "Cross-fitting settings",
    frozenset({"config", "eval"}),  # config: --train_config (--config is this command's own YAML)
)
CROSSVAL_EVAL = Fields(
    "vtrans.config.EvalConfig",
    "Estimator and report settings of every fold",
    # the data, split and template are the cross-fitting's; each training seed is the estimators' seed
    frozenset({"data", "split", "template", "seed", "keep_seen", "split_seed", "val_fraction", "test_fraction"}),
)


def run_evaluate(args: Namespace) -> None:
    evaluate_command(EVALUATE.build(args), **_own(evaluate_command, args))


def run_crossval(args: Namespace) -> None:
    settings = CROSSVAL.build(args, config=args.train_config, eval=CROSSVAL_EVAL.build(args))
    crossval_command(settings, **_own(crossval_command, args))


def run_score(args: Namespace) -> None:
    score_command(SCORE.build(args), **_own(score_command, args))


def _own(command: Callable, args: Namespace) -> dict:
    """The values of a command function's own parameters (all but its settings) that were given or have a default."""
    return {name: args[name] for name in inspect.signature(command).parameters if name != "settings" and name in args}


def evaluate_parser() -> Parser:
    return command_parser(evaluate_command, EVALUATE)


def crossval_parser() -> Parser:
    parser = command_parser(crossval_command, CROSSVAL, CROSSVAL_EVAL)
    parser.add_argument(
        "--train_config",
        type=str,
        required=True,
        help=described(CROSSVAL.cls, "config"),
    )
    return parser


def score_parser() -> Parser:
    parser = command_parser(score_command, SCORE, skip={"prompts"})
    parser.add_argument("prompts", nargs="*", type=str, default=SUPPRESS, help="prompts to score (or --input FILE)")
    return parser


@dataclass(frozen=True)
class Subcommand:
    """A ``vtrans`` subcommand: its command function (whose docstring is its help), its parser, and how it runs."""

    command: Callable
    parser: Callable[[], Parser]
    run: Callable[[Namespace], None]


SUBCOMMANDS: dict[str, Subcommand] = {
    "evaluate": Subcommand(evaluate_command, evaluate_parser, run_evaluate),
    "crossval": Subcommand(crossval_command, crossval_parser, run_crossval),
    "score": Subcommand(score_command, score_parser, run_score),
    "estimators": Subcommand(estimators_command, lambda: command_parser(estimators_command), lambda args: estimators_command()),
}


def build_parser(command: str | None = None) -> ArgumentParser:
    """``vtrans evaluate|crossval|score``: one typed parser per subcommand.

    Given ``command``, only its parser is built in full; the others are listed with their help
    line and no options, so that ``vtrans score`` imports neither ``vtrans.evaluation.evaluate`` nor
    ``vtrans.evaluation.crossval`` (whose imports take seconds: Lightning, torchmetrics, matplotlib).
    """
    parser = Parser(
        prog="vtrans",
        description="How sure is a transformer? Train, score and compare. "
        "Training: vtrans fit|validate|test|predict --config configs/NAME.yaml (LightningCLI: vtrans fit --help).",
        subcommands=SUBCOMMANDS,
    )
    commands = parser.add_subcommands(dest="command")
    for name, sub in SUBCOMMANDS.items():
        built = sub.parser() if command in (None, name) else Parser()
        commands.add_subcommand(name, built, help=_summary(sub.command))
    return parser


def requested(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it names one: its first word that is not an option
    (``vtrans`` itself takes no option with a value)."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


def _summary(command: Callable) -> str:
    return docstring_parser.parse(command.__doc__ or "").short_description or ""


TRAINING = ("fit", "validate", "test", "predict")
"""``vtrans fit|validate|test|predict``: LightningCLI's subcommands, as ``python train.py`` runs them."""


def main(argv: list[str] | None = None) -> None:
    """``vtrans fit|evaluate|crossval|score|estimators``."""
    given = argv
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINING:
        train_main(given)  # None: LightningCLI reads the command line itself
        return
    cfg = build_parser(requested(argv)).parse_args(argv)
    log.setup(quiet=bool(cfg[cfg.command].get("quiet", False)))
    guarded(lambda: SUBCOMMANDS[cfg.command].run(cfg[cfg.command]))


if __name__ == "__main__":
    main()
