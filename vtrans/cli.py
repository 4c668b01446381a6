"""Command lines: ``python train.py`` (LightningCLI) and ``vtrans evaluate|crossval|score``.

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

import importlib
import inspect
import os
import re
import sys
from argparse import SUPPRESS
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from typing import Literal, get_type_hints

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from vtrans import log
from vtrans.config import EstimatorConfig
from vtrans.errors import ConfigError, TrainingStopped, UserError


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
    except TrainingStopped as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except FileNotFoundError as err:
        fail(f"file not found: {err.filename or err}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def train_main(args: list[str] | None = None, run: bool = True):
    """``python train.py fit|validate|test --config configs/NAME.yaml``.

    Built by :class:`vtrans.training.TrainingCLI`, as every training run is. Checkpoints are
    written atomically and refuse non-finite tensors (``AtomicCheckpointIO``, the default
    ``trainer.plugins``), and they carry the random states so that ``--ckpt_path`` resumes an
    epoch exactly (``ResumableRNG``, always on). A non-finite loss, weight or gradient (``NonFiniteGuard``, always on) ends the run with one line on stderr naming the
    step and exit code 1. A setting out of range (the data's, the latent's, the backbone's or the
    trainer's) ends it with one line on stderr and exit code 2. With ``run=False`` the configured
    ``LightningCLI`` is returned without running a subcommand (``args`` then holds no subcommand).
    """
    from vtrans.callbacks import NonFiniteGuard
    from vtrans.training import TrainingCLI, stopping

    log.setup(quiet=False)
    guard = NonFiniteGuard()

    def build():
        with stopping(guard):
            return TrainingCLI(args=args, run=run, guard=guard)

    return guarded(build)


# --------------------------------------------------------------------------- the commands


def evaluate_command(
    settings: EvalConfig,  # noqa: F821 (imported with its parser, see Fields)
    out: str,
    ckpt: str | None = None,
    model: str = "smollm2",
    template: str | None = None,
    device: str = "auto",
    devices: int = 1,
    quiet: bool = False,
) -> None:
    """Compare every uncertainty estimator on idiom completion.

    Writes results.json, scores.jsonl, report.md and the plots into ``out`` and prints the table.

    Args:
        settings: the data, estimator and report settings (the options after these).
        out: output folder: results.json, scores.jsonl, report.md, plots.
        ckpt: a trained latent (``train.py fit``); without it, only the estimators that need no latent run.
        model: backbone when no ``--ckpt`` is given.
        template: prompt template with one ``{prefix}`` field; null: the checkpoint's, else the built-in one.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        devices: processes to share the batches (one GPU each on CUDA, gloo on CPUs); the results
            are those of one process.
        quiet: no progress bars and none of the run's notices (what it evaluates, its phases, a small n);
            the estimators not run are still named.
    """
    from vtrans import checkpoint, distributed
    from vtrans.data import DEFAULT_TEMPLATE
    from vtrans.evaluate import evaluate
    from vtrans.loading import resolve_device
    from vtrans.report import format_table

    if devices > 1:
        own = dict(out=out, ckpt=ckpt, model=model, template=template, device=device, quiet=quiet)
        return on_devices(evaluate_command, devices, resolve_device(device), dict(settings=settings, **own))
    template = template or (checkpoint.template_of(ckpt) if ckpt else None) or DEFAULT_TEMPLATE
    settings = replace(settings, template=template)
    results = evaluate(settings, out, ckpt=ckpt, model=model, device=resolve_device(device), progress=not quiet)
    if distributed.current().rank != 0:
        return None
    reasons: dict[str, list[str]] = {}
    for name, why in results.get("dropped", {}).items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        log.log.warning(f"not run: {', '.join(names)}: {why}")
    if results.get("random_weights"):
        print(f"{results['model']}: the accuracy and the AUROCs below are not results\n")
    print(format_table(results))
    print(f"\nwrote {out}/results.json, scores.jsonl, report.md and plots")
    return None


def crossval_command(
    settings: CrossvalConfig,  # noqa: F821 (imported with its parser, see Fields)
    out: str,
    markdown: str | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> None:
    """Cross-fitted comparison: K latents, each scoring the fold it did not train on, over several seeds.

    Trains the latent K times, each time on the idioms outside one fold, and scores that fold with
    every estimator, so that every idiom gets an out-of-fold score; repeats over seeds. Writes
    results.json, scores.jsonl, report.md and plots into ``out``. Each finished unit (a seed's
    fold: its latent and its scores) is recorded in ``out/units`` as it finishes: the same
    command run again on the same ``out`` resumes from them, and one with other settings is refused.

    Args:
        settings: the cross-fitting and estimator settings (the options after these).
        out: output folder.
        markdown: also write the report here (e.g. docs/results.md), its images linked relative to it.
        device: ``auto``: where the training config's trainer trains (``trainer.accelerator``,
            ``trainer.devices``); ``cpu``, ``cuda`` or ``cuda:N``: train and score there instead.
        quiet: no progress output.
    """
    from vtrans.crossval import crossval
    from vtrans.loading import resolve_device
    from vtrans.report import format_table

    device = device if device == "auto" else resolve_device(device)
    results = crossval(settings, out, markdown, device=device, progress=not quiet)
    for name, why in results.get("dropped", {}).items():
        log.log.warning(f"not run: {name}: {why}")
    if results.get("random_weights"):
        print(f"{results['model']}: the accuracy and the AUROCs below are not results\n")
    print(format_table(results))
    print(f"\nwrote {out}/results.json, scores.jsonl, report.md and plots ({results['seconds_total'] / 60:.1f} min)")


def score_command(
    settings: EstimatorConfig,
    ckpt: str,
    prompts: list[str] | None = None,
    input: str | None = None,
    estimators: list[str] | str | None = None,
    template: str = "ckpt",
    long_prompts: Literal["truncate", "refuse"] = "truncate",
    device: str = "auto",
    devices: int = 1,
    quiet: bool = False,
) -> None:
    """Score prompts with a trained checkpoint: one JSON line per prompt.

    One JSON line per prompt on stdout: {prompt, template, completion, completion_word, scores};
    a prompt that cannot be scored gives {prompt, error} and the others are scored. A prompt is
    an idiom's beginning ("spill the"): the checkpoint's template makes it the prompt the latent
    was trained on (``--template none`` scores prompts verbatim). Prompts longer than the
    model's context are truncated from the left with a warning (``--long_prompts refuse`` makes
    them errors). The input, the estimators and the template are checked before the model loads.

    Args:
        settings: the estimator settings (the options after these).
        ckpt: a trained latent (``train.py fit``).
        prompts: prompts to score.
        input: a .jsonl/.ndjson file (field ``prompt``), any other file one prompt a line, ``-`` for stdin.
        estimators: estimator names, a list or one comma-separated string; null: every single-pass
            and latent one the checkpoint supports (``mc_dropout_*`` may be asked for, a fitted one
            such as ``probe`` not). ``vtrans estimators`` lists them.
        template: ``ckpt``: the template the latent was trained with (the built-in one if it
            records none); ``none``: prompts verbatim; or a template with one ``{prefix}`` field.
        long_prompts: prompts longer than the context: ``truncate`` (from the left) or ``refuse``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        devices: processes to share the batches (one GPU each on CUDA, gloo on CPUs); the records
            are those of one process, in input order.
        quiet: no progress bar and no warnings.
    """
    from vtrans import distributed
    from vtrans.scorer import Line, Scorer, open_input, write_jsonl

    if input and prompts:
        fail("give prompts or --input FILE, not both")
    if input:
        lines, total = open_input(input)
        if devices > 1 and input == "-":
            fail("--devices needs prompts or an --input file: standard input cannot be read by several processes")
    elif prompts:
        lines, total = (Line(p) for p in prompts), len(prompts)
    else:
        fail("nothing to score: give prompts or --input FILE")
    estimators = None if estimators is None else comma_list("estimators", estimators)
    if devices > 1:
        from vtrans import checkpoint
        from vtrans.scorer import check_request

        check_request(checkpoint.read(ckpt), estimators, template, settings)  # before any process starts
        own = dict(ckpt=ckpt, prompts=prompts, input=input, estimators=estimators, template=template)
        own.update(long_prompts=long_prompts, device=device, quiet=quiet)
        from vtrans.loading import resolve_device

        return on_devices(score_command, devices, resolve_device(device), dict(settings=settings, **own))
    rank = distributed.current().rank
    scorer = Scorer.from_checkpoint(
        ckpt,
        device=device,
        estimators=estimators,
        template=template,
        config=settings,
        long_prompts=long_prompts,
        quiet=quiet,
    )
    sys.stdout.flush()
    if rank != 0:  # under a process group every rank yields every record; rank 0 writes them
        for _ in scorer.score_lines(lines, total):
            pass
        return None
    try:
        written, errors = write_jsonl(scorer.score_lines(lines, total), sys.stdout.buffer)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    if errors:
        log.log.warning(f"{errors} of {written} prompts could not be scored (see their 'error' fields)")
    return None


def estimators_command() -> None:
    """List the estimators: each name, what it needs, and what it measures.

    Higher always means more uncertain. ``score`` runs the names marked as its defaults when
    none are asked for; ``evaluate`` and ``crossval`` run every one that applies.
    """
    from vtrans.estimators import registry

    print(registry.table())


def on_devices(command: Callable, devices: int, device: str, kwargs: dict) -> None:
    """Run ``command(**kwargs)`` in ``devices`` processes of one process group (``vtrans.distributed``) on ``device``."""
    import torch

    from vtrans import distributed

    if devices < 1:
        fail(f"devices must be >= 1, got {devices}")
    if device.startswith("cuda") and devices > (gpus := torch.cuda.device_count()):
        fail(f"--devices {devices} on {device}: this machine has {gpus} GPU(s)")
    distributed.launch(_on_rank, devices, device, command, kwargs)


def _on_rank(command: Callable, kwargs: dict) -> None:
    """One rank of a multi-process command: rank 0 speaks, the others keep quiet (they run the same work)."""
    from vtrans import distributed

    rank = distributed.current().rank
    if rank != 0:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
    log.setup(quiet=bool(kwargs.get("quiet")) or rank != 0)  # a spawned process starts unconfigured
    guarded(lambda: command(**kwargs))


# --------------------------------------------------------------------------- typed options

COMMA_LISTS: dict[str, type] = {"estimators": str, "seeds": int}
"""List fields that also take one comma-separated string: ``--estimators msp,entropy``, ``--seeds 0,1,2``."""


def comma_list(name: str, value: list | str | int | None, item: type = str) -> list | None:
    """A list option's value as a list: ``"msp,entropy"`` -> ``["msp", "entropy"]``, ``0`` -> ``[0]``
    (``None``, the default of some, stays ``None``)."""
    if value is None or isinstance(value, list):
        return value
    if not isinstance(value, str):
        return [value]
    parts = [part.strip() for part in value.split(",") if part.strip()]
    try:
        return [item(part) for part in parts]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated {item.__name__} values, got {value!r}") from None


def described(obj: Callable | type, name: str) -> str:
    """A parameter's or field's description in the docstring of ``obj`` (a function, or a
    dataclass and its parents: their ``Attributes:``)."""
    for source in getattr(obj, "__mro__", (obj,)):
        for param in docstring_parser.parse(source.__doc__ or "").params:
            if param.arg_name == name:
                return param.description or ""
    return ""


def field_default(cls: type, name: str):
    """The default a dataclass gives one of its fields."""
    field = next(f for f in fields(cls) if f.name == name)
    return field.default_factory() if field.default is MISSING else field.default


def add_flag(target, name: str, default: bool, help: str) -> None:
    """A boolean option as a flag: ``--quiet`` alone is true (and never takes the prompt after it as
    its value), ``--no_quiet`` false; a config file says ``quiet: true``."""
    target.add_argument(f"--{name}", action=ActionYesNo, default=default, help=help)


@dataclass(frozen=True)
class Fields:
    """The fields of a settings dataclass that a command takes as top-level options.

    The dataclass is named by its import path and imported when a parser is built or read: a
    subcommand imports only its own settings' module (``vtrans score`` does not import
    ``vtrans.crossval``, and so not Lightning).
    """

    path: str
    title: str
    skip: frozenset[str] = frozenset()

    @property
    def cls(self) -> type:
        module, name = self.path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    @property
    def names(self) -> list[str]:
        return [f.name for f in fields(self.cls) if f.name not in self.skip]

    def add_to(self, parser: ArgumentParser) -> None:
        """jsonargparse adds each field with its type, default and docstring; booleans become flags
        and the lists of :data:`COMMA_LISTS` also take a comma-separated string."""
        hints = get_type_hints(self.cls)
        special = [name for name in self.names if hints[name] is bool or name in COMMA_LISTS]
        parser.add_class_arguments(self.cls, skip=set(self.skip) | set(special), help=f"{self.title} ({self.path})")
        group = parser.groups.get(self.cls.__name__, parser)
        for name in special:
            default, help = field_default(self.cls, name), described(self.cls, name)
            if hints[name] is bool:
                add_flag(group, name, default, help)
                continue
            item = COMMA_LISTS[name]
            group.add_argument(
                f"--{name}",
                type=list[item] | item | str,
                default=default,
                help=f"{help.rstrip('.')}; a list, or one comma-separated string.",
            )

    def values(self, args: Namespace) -> dict:
        """The parsed values of these fields, lists as lists."""
        values = {name: args[name] for name in self.names}
        for name, item in COMMA_LISTS.items():
            if name in values:
                values[name] = comma_list(name, values[name], item)
        return values

    def build(self, args: Namespace, **more):
        """The settings dataclass from the parsed values (and ``more`` fields)."""
        return self.cls(**self.values(args), **more)


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


class Parser(ArgumentParser):
    """jsonargparse's parser, whose errors are one line (:func:`plain_error`) and a pointer to
    ``--help``, not the whole usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            super().error(message, ex)  # raises, for the parser of a subcommand
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sub = re.search(r"required: (\w+)\.", message)  # a subcommand's missing option is reported by the top parser
        if sub and sub.group(1) in SUBCOMMANDS and not prog.endswith(sub.group(1)):
            prog = f"{prog} {sub.group(1)}"
        print(f"error: {plain_error(message)} (see: {prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _option(key: str) -> str:
    """A parser key as the user types it: ``evaluate.out`` -> ``--out``."""
    return "--" + key.strip().split(".")[-1]


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``, ``<class 'NoneType'>`` -> ``null``, ``typing.Literal['a', 'b']`` -> ``one of a, b``."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text.strip())
    if literal:
        return "one of " + ", ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
    name = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text.strip())
    return "null" if name == "NoneType" else name


def plain_error(message: str) -> str:
    """jsonargparse's message for a bad command line, as one line that names the option as typed.

    ``the following arguments are required: evaluate.out`` -> ``--out is required``;
    ``Parser key "split": Expected a typing.Literal[...]. Got value: bogus`` ->
    ``--split: expected one of train, val, test, all; got 'bogus'``.
    """
    message = message.strip()
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [_option(k) for k in required.group(1).split(",")]
        return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required"
    keyed = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not keyed:
        return " ".join(message.split())
    option, detail = _option(keyed.group(1)), keyed.group(2)
    expected = re.match(r"Expected a (.*?)\. Got value: (.*)", detail)
    if expected:
        return f"{option}: expected {_type_name(expected.group(1))}, got {expected.group(2).strip()!r}"
    union = re.search(r"Subtypes: \[(.*?)\].*Given value: (.*)", detail, re.S)
    if union:
        types = " or ".join(_type_name(t) for t in re.findall(r"<class '[\w.]+'>|typing\.Literal\[[^\]]*\]", union.group(1)))
        return f"{option}: expected {types}, got {union.group(2).strip()!r}"
    return f"{option}: {' '.join(detail.split())}"


def command_parser(command: Callable, *settings: Fields, skip: set[str] = frozenset()) -> Parser:
    """A subcommand's parser: ``--config``/``--print_config``, the command's own options, then its settings'."""
    doc = docstring_parser.parse(command.__doc__ or "")
    parser = Parser(description="\n\n".join(filter(None, [doc.short_description, doc.long_description])))
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (--print_config writes one)")
    settings_classes = {group.cls.__name__: group.cls for group in settings}  # imported on demand, not globals here
    flags = [name for name, hint in get_type_hints(command, localns=settings_classes).items() if hint is bool]
    parser.add_function_arguments(command, as_group=False, skip={"settings", *skip, *flags})
    for name in flags:
        add_flag(parser, name, inspect.signature(command).parameters[name].default, described(command, name))
    for group in settings:
        group.add_to(parser)
    return parser


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
    line and no options, so that ``vtrans score`` imports neither ``vtrans.evaluate`` nor
    ``vtrans.crossval`` (whose imports take seconds: Lightning, torchmetrics, matplotlib).
    """
    parser = Parser(
        prog="vtrans",
        description="How sure is a transformer? Train, score and compare. "
        "Training: vtrans fit|validate|test|predict --config configs/NAME.yaml (LightningCLI: vtrans fit --help).",
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
