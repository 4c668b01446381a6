"""Score prompts with a trained checkpoint: the Python API behind ``vtrans score``.

    >>> scorer = Scorer.from_checkpoint("checkpoints/smollm2/last.ckpt")
    >>> for record in scorer.score(["Complete the idiom: the early bird catches the"]):
    ...     print(record["completion"], record["scores"]["lens_ce"])

With a model of one's own already loaded, and a latent trained on it and saved with
``save_pretrained``: ``Scorer.from_pretrained(folder, backbone=Backbone.from_model(model, tokenizer))``.

For every prompt the base model (latent off) completes it, and every requested estimator
scores that completion, exactly as in ``vtrans evaluate`` (through the same
:class:`vtrans.estimators.runner.Runner`); there is no target, so no label.

What the records hold is ``vtrans.scoring.records``'; how a checkpoint's template applies,
``vtrans.scoring.request``'; what is done to a prompt before it is scored (blank ones, ones
longer than the context), ``vtrans.scoring.prompts``'; how input files are read,
``vtrans.scoring.inputs``'.

**Streaming.** :meth:`Scorer.score` consumes its iterable lazily, ``batch_size`` prompts at a
time, and yields each batch's records before reading the next: memory stays bounded however
long the input. A tqdm bar on stderr shows progress unless ``quiet`` (or the input is known
to fit in one batch).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vtrans import log
from vtrans.config import EstimatorConfig
from vtrans.estimators import distributed
from vtrans.estimators.distributed import Shard
from vtrans.scoring.inputs import Line
from vtrans.scoring.prompts import LongPrompts, PromptPolicy
from vtrans.scoring.records import scored_records
from vtrans.scoring.request import check_estimators, estimator_config, load_request, prior_of


def _batched(iterable: Iterable, n: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _progress(total: int | None, shown: bool) -> tqdm:
    """The bar of a scoring run on stderr, off where ``shown`` is false or the command line is ``--quiet``."""
    disable = not log.bars_enabled(shown)
    return tqdm(total=total, desc="scoring", unit="prompt", file=sys.stderr, dynamic_ncols=True, disable=disable)


class Scorer:
    """Completions and uncertainty scores for prompts, from a trained latent (see the module docstring)."""

    def __init__(
        self,
        module,
        estimators: list[str] | None = None,
        template: str | None = None,
        *,
        config: EstimatorConfig | None = None,
        long_prompts: LongPrompts = "truncate",
        quiet: bool = False,
        **settings: Any,
    ) -> None:
        """Wrap a loaded latent model (use :meth:`from_checkpoint` to load one).

        Args:
            module: a ``vtrans.latent.model.LatentModel`` with its backbone, in eval mode.
            estimators: names from ``vtrans.estimators.registry.SCORABLE`` (default:
                :func:`default_estimators`); ``mc_dropout_*`` may be asked for (T = ``passes``
                forwards each), a fitted one may not.
            template: a template with one ``{prefix}`` field applied to every input; ``None``
                scores the inputs verbatim (:meth:`from_checkpoint` applies the checkpoint's).
            config: the estimator settings (batch size, samples of z, MC dropout passes, seed, ...).
            long_prompts: ``truncate`` (from the left, with a warning) or ``refuse`` (an error record).
            quiet: no progress bar and no warnings on stderr.
            settings: fields of :class:`vtrans.config.EstimatorConfig` that override ``config``'s
                (``Scorer(module, batch_size=8, samples=16)``).
        """
        config = estimator_config(config, settings)
        asked = None if estimators is None else list(estimators)
        names = check_estimators(asked, prior_of(module), config.aggregate, config.answer_words)
        self._setup(module, names, template, config, long_prompts, quiet)

    def _setup(
        self, module, names: list[str], template: str | None, config: EstimatorConfig, long_prompts: LongPrompts = "truncate",
        quiet: bool = False,
    ) -> None:
        """The scorer of ``names``, checked already (:func:`vtrans.scoring.request.check_estimators`)."""
        from vtrans.estimators.runner import Runner

        self.config = config
        self.prompts = PromptPolicy(
            module.backbone, template, long_prompts, quiet, self.config.max_new_tokens * self.config.answer_words
        )
        self.module, self.names, self.template = module, names, template
        self.batch_size, self.long_prompts, self.quiet = self.config.batch_size, long_prompts, quiet
        self.context, self.max_prompt_tokens = self.prompts.context, self.prompts.max_prompt_tokens
        self.shard = distributed.current()  # the scorer deals out whole batches; each runs in one process
        self.runner = Runner(module.backbone, module, self.config, progress=False, shard=Shard())
        self.tokenizer = module.backbone.tokenizer
        self.calibration = module.calibration
        fitted_words = getattr(self.calibration, "answer_words", 1)
        if self.calibration is not None and fitted_words != config.answer_words:
            if not quiet:
                log.log.warning(
                    f"the latent's calibration is of answers of {fitted_words} word(s), these are of {config.answer_words}: "
                    f"the records have no p_wrong (--answer_words {fitted_words} gives it)"
                )
            self.calibration = None
        self._run = list(names)  # what the runner computes: the names asked for, and the score p_wrong reads
        if self.calibration is not None and self.calibration.estimator not in self._run:
            self._run.append(self.calibration.estimator)
        if module.calibration is None and not quiet:
            log.log.warning(f"this latent carries no calibration, so the records have no p_wrong: {module.calibration_missing}")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        estimators: list[str] | None = None,
        template: str | None = "ckpt",
        backbone=None,
        **options: Any,
    ) -> Scorer:
        """Load a checkpoint written by ``train.py fit`` (safely: see ``vtrans.latent.checkpoint``), or a
        folder written by ``LatentModel.save_pretrained``.

        The request (estimators, template, settings) is checked against what the checkpoint
        records before the base model loads.

        Args:
            path: the checkpoint file, or the folder.
            device: ``auto`` (where the ``backbone`` given is; else CUDA when available), ``cpu``,
                ``cuda`` or ``cuda:N`` (which moves a ``backbone`` given there).
            estimators: see :class:`Scorer`.
            template: ``ckpt`` (default): the template the latent was trained with, so that an
                input is an idiom's beginning as in training; ``None`` (or ``"none"``): inputs
                verbatim; or a template with one ``{prefix}`` field.
            backbone: the base model to score with, a ``vtrans.backbone.loading.Backbone`` (one made by
                ``Backbone.from_model`` from a model in memory, say); default: load the one the
                checkpoint names. Either way its fingerprint must be the checkpoint's.
            options: the other keyword arguments of :class:`Scorer`.

        Raises:
            vtrans.latent.checkpoint.CheckpointError: a missing, truncated, unsafe or foreign file, a
                checkpoint of another base model, or of a model in memory not given.
            vtrans.errors.ConfigError: an estimator or setting the checkpoint cannot score with.
        """
        module, names, template, config = load_request(path, device, estimators, template, backbone, options)
        scorer = cls.__new__(cls)  # the names were checked against the checkpoint, before it loaded
        scorer._setup(module, names, template, config, **options)
        return scorer

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone=None,
        device: str = "auto",
        estimators: list[str] | None = None,
        template: str | None = "ckpt",
        **options: Any,
    ) -> Scorer:
        """Load a latent that ``LatentModel.save_pretrained`` wrote into ``directory``: the
        Hugging Face spelling of :meth:`from_checkpoint` (see there; ``template="ckpt"`` is the
        template the folder records)."""
        return cls.from_checkpoint(directory, device, estimators, template, backbone=backbone, **options)

    def score(self, prompts: Iterable[str], total: int | None = None) -> Iterator[dict]:
        """One record per prompt, in order, lazily (see the module docstring for their form).

        Args:
            prompts: any iterable of strings; it is read ``batch_size`` items at a time.
            total: how many there are, for the progress bar (default: ``len(prompts)`` if defined).
        """
        if isinstance(prompts, str | bytes):
            raise TypeError("score() takes an iterable of prompts: wrap a single prompt in a list")
        if total is None and hasattr(prompts, "__len__"):
            total = len(prompts)
        return self.score_lines((Line(p) for p in prompts), total)

    def score_lines(self, lines: Iterable[Line], total: int | None = None) -> Iterator[dict]:
        """Like :meth:`score`, for inputs that may already carry an error (lines of a file).

        Under a process group (``vtrans.estimators.distributed``) every rank reads the same input, the
        batches are dealt out round by round (batch ``b`` to rank ``b % world``), and every
        rank yields every record, in input order.
        """
        shard = self.shard
        small = total is not None and total <= self.batch_size  # known to fit in one batch
        bar = _progress(total, not self.quiet and shard.rank == 0 and not small)
        scored = 0  # prompts scored so far: the index of the next one in the run (the seed of its draws)
        start = time.perf_counter()
        try:
            for batches in _batched(_batched(lines, self.batch_size), shard.world):
                done = {}
                for b, batch in enumerate(batches):
                    records, ready, truncated = self.prompts.prepare(batch, warn=b % shard.world == shard.rank)
                    if shard.mine(b):
                        done[b] = self._finish(batch, records, ready, truncated, scored)
                    scored += len(ready)
                for records in shard.merge(done):
                    yield from records
                bar.update(sum(len(batch) for batch in batches))
        finally:
            bar.close()
        log.log.info(f"scored {scored} prompts with {len(self.names)} estimators ({time.perf_counter() - start:.1f} s)")

    def truncate_left(self, text: str, budget: int) -> str:
        """The longest end of ``text`` (cut at a token boundary) that tokenises to at most ``budget`` tokens."""
        return self.prompts.truncate_left(text, budget)

    def _finish(
        self, lines: list[Line], records: list[dict | None], ready: list[tuple[int, str]], truncated: dict[int, int], start: int
    ) -> list[dict]:
        """Score the ready prompts of a batch (``start``: how many were scored before them) and fill in their records."""
        completions, scores = self.runner.score_prompts([t for _, t in ready], self._run, start) if ready else ([], {})
        random_weights = self.module.backbone.random_weights
        p_wrong = None
        if self.calibration is not None and ready:
            p_wrong = self.calibration(scores[self.calibration.estimator].double().numpy())
        tokenizer = self.module.backbone.tokenizer
        answers = [[tokenizer.decode([t]) for t in c.word_ids] for c in completions]
        return scored_records(
            lines, records, ready, truncated, completions, scores, self.names, self.template, random_weights, p_wrong,
            answers,
        )
