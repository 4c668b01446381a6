"""Command lines: ``python train.py`` (LightningCLI) and ``vtrans evaluate|score``."""

from __future__ import annotations

import argparse
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


def train_main(args: list[str] | None = None, run: bool = True):
    """``python train.py fit|validate|test --config configs/NAME.yaml``.

    Checkpoints are written atomically and refuse non-finite tensors (``AtomicCheckpointIO``,
    the default ``trainer.plugins``), and they carry the random states so that ``--ckpt_path``
    resumes an epoch exactly (``ResumableRNG``, always on). A non-finite loss, weight or
    gradient (``NonFiniteGuard``, always on) ends the run with one line on stderr naming the
    step and exit code 1. A setting out of range (the data's, the latent's, the backbone's or the
    trainer's) ends it with one line on stderr and exit code 2. With ``run=False`` the configured ``LightningCLI`` is returned without
    running a subcommand (``args`` then holds no subcommand).
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from vtrans.callbacks import NonFiniteGuard, ResumableRNG
    from vtrans.errors import ConfigError

    guard = NonFiniteGuard()
    from vtrans.data import IdiomDataModule
    from vtrans.module import LatentLM

    def build():
        try:
            return LightningCLI(
                LatentLM,
                IdiomDataModule,
                args=args,
                run=run,
                save_config_kwargs={"overwrite": True},
                trainer_defaults={
                    "plugins": [{"class_path": "vtrans.checkpoint.AtomicCheckpointIO"}],
                    "callbacks": [ResumableRNG(), guard],
                },
            )
        except MisconfigurationException as err:  # a trainer setting Lightning cannot use (devices, max_epochs, ...)
            lines = str(err).strip().splitlines()
            raise ConfigError(f"trainer: {lines[0] if lines else type(err).__name__}") from None

    try:
        return guarded(build)
    except FloatingPointError as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as err:  # a distribution's validation: NaN or inf among its parameters
        if "invalid values" not in str(err):
            raise
        first = str(err).strip().splitlines()[0]
        print(f"error: training stopped: non-finite values at {guard.where()}: {first}", file=sys.stderr)
        raise SystemExit(1) from None


def _estimator_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    from vtrans.data import DEFAULT_TEMPLATE
    from vtrans.estimators.registry import NAMES

    parser = argparse.ArgumentParser(prog="vtrans", description="How sure is a transformer? Score and compare.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="compare every uncertainty estimator on idiom completion")
    ev.add_argument("--ckpt", help="a trained latent (train.py fit); without it, only estimators that need no latent")
    ev.add_argument("--model", default="smollm2", help="backbone when no --ckpt is given (default: smollm2)")
    ev.add_argument("--data", default="builtin", help="data spec: builtin[:SPLIT], txt:PATH, epie:PATH, slide:PATH, magpie:PATH, wordnet:PATH")
    ev.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="split when the spec names none")
    ev.add_argument("--out", required=True, help="output folder: results.json, scores.jsonl, report.md, plots")
    ev.add_argument("--template", default=None, help=f"prompt template (default: the checkpoint's, else {DEFAULT_TEMPLATE!r})")
    ev.add_argument("--estimators", type=_estimator_list, default=list(NAMES), help="comma-separated subset of: " + ", ".join(NAMES))
    ev.add_argument("--passes", "-T", type=int, default=16, help="MC dropout passes (default 16)")
    ev.add_argument("--dropout", type=float, default=0.1, help="MC dropout probability (default 0.1)")
    ev.add_argument(
        "--mc-from-layer", type=int, default=0, help="MC dropout: blocks below this one stay deterministic and run once"
    )
    ev.add_argument("--samples", "-S", type=int, default=32, help="samples of z for latent_mi (default 32)")
    ev.add_argument(
        "--z-draws", default="random", choices=["random", "antithetic", "sobol"], help="how latent_mi draws z (default random)"
    )
    ev.add_argument("--aggregate", default="first", choices=["first", "mean", "max"], help="token scores over the completion word")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=6)
    ev.add_argument("--sample", action="store_true", help="sample completions instead of greedy decoding")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0)
    _agreement_arguments(ev)
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ev.add_argument("--max-items", type=int, default=None)
    ev.add_argument(
        "--keep-seen", action="store_true", help="keep items whose idiom the checkpoint's latent was trained on (default: left out)"
    )
    ev.add_argument("--split-seed", type=int, default=None, help="seed of the idiom split (default: the checkpoint's, else 0)")
    ev.add_argument("--val-fraction", type=float, default=None, help="validation fraction (default: the checkpoint's, else 0.15)")
    ev.add_argument("--test-fraction", type=float, default=None, help="test fraction (default: the checkpoint's, else 0.15)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(run=run_evaluate)

    cv = sub.add_parser(
        "crossval",
        help="cross-fitted comparison: K latents, each scoring the fold it did not train on, over several seeds",
        description="Train the latent K times, each time on the idioms outside one fold, and score that fold with "
        "every estimator, so that every idiom gets an out-of-fold score; repeat over seeds. Writes results.json, "
        "scores.jsonl, report.md and plots into --out.",
    )
    cv.add_argument("--config", required=True, help="the training YAML (configs/NAME.yaml): backbone, latent settings, epochs")
    cv.add_argument("--data", default=None, help="idioms to cross-fit and score (default: the config's data): builtin, txt:PATH, epie:PATH, slide:PATH, magpie:PATH, wordnet:PATH")
    cv.add_argument("--extra-train", default=None, help="a data spec added to every fold's training set and never scored (idioms also in --data are left out of it)")
    cv.add_argument("--folds", type=int, default=5, help="K folds (default 5; 1 trains on --extra-train only and scores all of --data)")
    cv.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=[0, 1, 2], help="comma-separated training seeds (default 0,1,2)")
    cv.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    cv.add_argument("--epochs", type=int, default=None, help="training epochs per fold (default: the config's)")
    cv.add_argument("--out", required=True, help="output folder")
    cv.add_argument("--markdown", default=None, help="also write the report here (e.g. docs/results.md), its images linked relative to it")
    cv.add_argument(
        "--self-targets",
        action="store_true",
        help="also train each latent on the base model's own completion word where it differs from the idiom's",
    )
    cv.add_argument("--save-checkpoints", action="store_true", help="keep every fold's latent under OUT/checkpoints")
    cv.add_argument(
        "--from-checkpoints",
        default=None,
        metavar="DIR",
        help="load each fold's latent from DIR (an earlier run's OUT/checkpoints) instead of training it; each must have trained on this fold's idioms",
    )
    cv.add_argument("--template", default=None, help="prompt template (default: the config's)")
    cv.add_argument("--estimators", type=_estimator_list, default=list(NAMES), help="comma-separated subset of: " + ", ".join(NAMES))
    cv.add_argument("--passes", "-T", type=int, default=16, help="MC dropout passes (default 16)")
    cv.add_argument("--dropout", type=float, default=0.1, help="MC dropout probability (default 0.1)")
    cv.add_argument("--samples", "-S", type=int, default=32, help="samples of z for latent_mi (default 32)")
    cv.add_argument(
        "--z-draws", default="random", choices=["random", "antithetic", "sobol"], help="how latent_mi draws z (default random)"
    )
    cv.add_argument("--batch-size", type=int, default=32)
    cv.add_argument("--max-new-tokens", type=int, default=6)
    cv.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    cv.add_argument("--max-items", type=int, default=None, help="use only the first N idioms (quick runs)")
    cv.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    cv.add_argument("--quiet", action="store_true", help="no progress output")
    cv.set_defaults(run=run_crossval)

    sc = sub.add_parser(
        "score",
        help="score prompts with a trained checkpoint: one JSON line per prompt",
        description="One JSON line per prompt on stdout: {prompt, completion, scores}; a prompt that cannot be "
        "scored gives {prompt, error} and the others are scored. Prompts longer than the model's context are "
        "truncated from the left with a warning (--long-prompts refuse makes them errors).",
    )
    sc.add_argument("--ckpt", required=True, help="a trained latent (train.py fit)")
    sc.add_argument("prompts", nargs="*", help="prompts to score")
    sc.add_argument("--input", help="a .jsonl/.ndjson file (field 'prompt'), any other file one prompt a line, - for stdin")
    sc.add_argument(
        "--estimators",
        type=_estimator_list,
        default=None,
        help="comma-separated subset of: " + ", ".join(n for n in NAMES if n != "probe")
        + " (default: all single-pass and latent ones)",
    )
    sc.add_argument("--template", default=None, help="a {prefix} template applied to every prompt; 'ckpt' for the checkpoint's (default: none, prompts verbatim)")
    sc.add_argument("--long-prompts", default="truncate", choices=["truncate", "refuse"], help="prompts longer than the context (default: truncate from the left)")
    sc.add_argument("--passes", "-T", type=int, default=16, help="MC dropout passes (default 16)")
    sc.add_argument("--dropout", type=float, default=0.1, help="MC dropout probability (default 0.1)")
    sc.add_argument("--samples", "-S", type=int, default=32, help="samples of z for latent_mi (default 32)")
    sc.add_argument("--max-new-tokens", type=int, default=6)
    sc.add_argument("--seed", type=int, default=0)
    _agreement_arguments(sc)
    sc.add_argument("--batch-size", type=int, default=32)
    sc.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    sc.add_argument("--quiet", action="store_true", help="no progress bar and no warnings")
    sc.set_defaults(run=run_score)
    return parser


def _agreement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agreement-samples", "-K", type=int, default=10, help="sampled completions per prompt for sample_* (default 10)"
    )
    parser.add_argument(
        "--agreement-temperature", type=float, default=1.0, help="their sampling temperature (default 1.0)"
    )


def run_evaluate(args: argparse.Namespace) -> None:
    from vtrans import checkpoint
    from vtrans.data import DEFAULT_TEMPLATE
    from vtrans.evaluate import EvalConfig, evaluate
    from vtrans.loading import resolve_device
    from vtrans.report import format_table

    template = args.template or (checkpoint.template_of(args.ckpt) if args.ckpt else None) or DEFAULT_TEMPLATE
    config = EvalConfig(
        data=args.data,
        split=args.split,
        template=template,
        estimators=args.estimators,
        passes=args.passes,
        dropout=args.dropout,
        mc_from_layer=args.mc_from_layer,
        samples=args.samples,
        z_draws=args.z_draws,
        aggregate=args.aggregate,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
        n_boot=args.n_boot,
        max_items=args.max_items,
        keep_seen=args.keep_seen,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        agreement_samples=args.agreement_samples,
        agreement_temperature=args.agreement_temperature,
    )
    results = evaluate(
        config, args.out, ckpt=args.ckpt, model=args.model, device=resolve_device(args.device), progress=not args.quiet
    )
    reasons: dict[str, list[str]] = {}
    for name, why in results.get("dropped", {}).items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        print(f"warning: not run: {', '.join(names)}: {why}", file=sys.stderr)
    if args.ckpt and results["seen"] is None:
        print("warning: the checkpoint does not record its training idioms: cannot leave them out", file=sys.stderr)
    elif results["seen_left_out"]:
        print(
            f"warning: left out {results['seen_left_out']} of {results['seen_of']} idioms the latent was trained on "
            "(--keep-seen keeps them)",
            file=sys.stderr,
        )
    elif results["seen"]:
        print(f"warning: kept {results['seen']} idioms the latent was trained on (--keep-seen)", file=sys.stderr)
    print(format_table(results))
    print(f"\nwrote {args.out}/results.json, scores.jsonl, report.md and plots")


def run_crossval(args: argparse.Namespace) -> None:
    from vtrans.crossval import CrossvalConfig, crossval
    from vtrans.evaluate import EvalConfig
    from vtrans.loading import resolve_device
    from vtrans.report import format_table

    evaluation = EvalConfig(
        estimators=args.estimators,
        passes=args.passes,
        dropout=args.dropout,
        samples=args.samples,
        z_draws=args.z_draws,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        n_boot=args.n_boot,
        max_items=args.max_items,
    )
    config = CrossvalConfig(
        config=args.config,
        data=args.data,
        extra_train=args.extra_train,
        folds=args.folds,
        seeds=args.seeds,
        fold_seed=args.fold_seed,
        epochs=args.epochs,
        save_checkpoints=args.save_checkpoints,
        from_checkpoints=args.from_checkpoints,
        template=args.template,
        self_targets=args.self_targets,
        eval=evaluation,
    )
    results = crossval(config, args.out, args.markdown, device=resolve_device(args.device), progress=not args.quiet)
    for name, why in results.get("dropped", {}).items():
        print(f"warning: not run: {name}: {why}", file=sys.stderr)
    print(format_table(results))
    print(f"\nwrote {args.out}/results.json, scores.jsonl, report.md and plots ({results['seconds_total'] / 60:.1f} min)")


def run_score(args: argparse.Namespace) -> None:
    """Stream one JSON line per prompt to stdout; the input is checked before the model loads."""
    import os

    from vtrans.scorer import Line, Scorer, open_input, write_jsonl

    if args.input and args.prompts:
        fail("give prompts or --input FILE, not both")
    if args.input:
        lines, total = open_input(args.input)
    elif args.prompts:
        lines, total = (Line(p) for p in args.prompts), len(args.prompts)
    else:
        fail("nothing to score: give prompts or --input FILE")
    scorer = Scorer.from_checkpoint(
        args.ckpt,
        device=args.device,
        estimators=args.estimators,
        batch_size=args.batch_size,
        template=args.template,
        passes=args.passes,
        dropout=args.dropout,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        agreement_samples=args.agreement_samples,
        agreement_temperature=args.agreement_temperature,
        long_prompts=args.long_prompts,
        quiet=args.quiet,
    )
    sys.stdout.flush()
    try:
        written, errors = write_jsonl(scorer.score_lines(lines, total), sys.stdout.buffer)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    if errors:
        print(f"warning: {errors} of {written} prompts could not be scored (see their 'error' fields)", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """``vtrans evaluate|crossval|score``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    guarded(lambda: args.run(args))
