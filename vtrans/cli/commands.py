"""The ``vtrans`` subcommands: what ``evaluate``, ``crossval``, ``score`` and ``estimators`` do once parsed.

Each is a function whose typed parameters and docstring are its options and its help
(``vtrans.cli.parsing`` turns them into a parser). A command ends as the contract for user
errors says (:func:`fail`, :func:`guarded`): one line on stderr and exit code 2; ``--devices N``
runs a command in N processes of one process group (:func:`on_devices`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Literal

from vtrans import log
from vtrans.cli.parsing import comma_list
from vtrans.config import EstimatorConfig
from vtrans.errors import TrainingStopped, UserError


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
    from vtrans.backbone.loading import resolve_device
    from vtrans.estimators import distributed
    from vtrans.evaluation.evaluate import evaluate
    from vtrans.evaluation.report import format_table

    if devices > 1:
        own = dict(out=out, ckpt=ckpt, model=model, template=template, device=device, quiet=quiet)
        return on_devices(evaluate_command, devices, resolve_device(device), dict(settings=settings, **own))
    results = evaluate(
        settings, out, ckpt=ckpt, model=model, device=resolve_device(device), progress=not quiet, template=template or "ckpt"
    )
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
    from vtrans.backbone.loading import resolve_device
    from vtrans.evaluation.crossval import crossval
    from vtrans.evaluation.report import format_table

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

    One JSON line per prompt on stdout: {prompt, template, completion, completion_word, scores,
    p_wrong}, ``p_wrong`` the probability that the completion is wrong, from the calibration the
    checkpoint carries (left out, with a warning, where it carries none); a prompt that cannot be scored gives {prompt, error} and the others are scored. A prompt is
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
    from vtrans.estimators import distributed
    from vtrans.scoring.inputs import Line, open_input
    from vtrans.scoring.records import write_jsonl
    from vtrans.scoring.scorer import Scorer

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
        from vtrans.latent import checkpoint
        from vtrans.scoring.request import check_request

        check_request(checkpoint.read(ckpt), estimators, template, settings)  # before any process starts
        own = dict(ckpt=ckpt, prompts=prompts, input=input, estimators=estimators, template=template)
        own.update(long_prompts=long_prompts, device=device, quiet=quiet)
        from vtrans.backbone.loading import resolve_device

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
    """Run ``command(**kwargs)`` in ``devices`` processes of one process group (``vtrans.estimators.distributed``) on ``device``."""
    import torch

    from vtrans.estimators import distributed

    if devices < 1:
        fail(f"devices must be >= 1, got {devices}")
    if device.startswith("cuda") and devices > (gpus := torch.cuda.device_count()):
        fail(f"--devices {devices} on {device}: this machine has {gpus} GPU(s)")
    distributed.launch(_on_rank, devices, device, command, kwargs)


def _on_rank(command: Callable, kwargs: dict) -> None:
    """One rank of a multi-process command: rank 0 speaks, the others keep quiet (they run the same work)."""
    from vtrans.estimators import distributed

    rank = distributed.current().rank
    if rank != 0:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
    log.setup(quiet=bool(kwargs.get("quiet")) or rank != 0)  # a spawned process starts unconfigured
    guarded(lambda: command(**kwargs))
