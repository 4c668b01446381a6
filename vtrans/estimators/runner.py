"""The runner: completions, then one forward per batch that every estimator reads.

Per batch of prompts:

1. the base model (latent off) completes each prompt (``vtrans.backbone.generate``; :class:`Completer`);
2. one forward of the base model over the prompts and their completions keeps what the asked-for
   families need (the slot logits always; every layer's stream, the attention weights, every
   block's keys and values only when a family asks for them; see ``vtrans.estimators.base``);
3. each family reads that forward. MC dropout, the z samples of ``latent_mi`` and the sampled
   completions add passes of their own, from the forward's states rather than from the tokens.

Which families run, what the forward keeps for them and how a batch is read is the run's plan
(``vtrans.estimators.plan``).

Where nothing comes between the completions and the scores (``vtrans score``), steps 1 and 2
are one pass: ``generate`` keeps the states the families read, and they are laid out as the
forward would have computed them (``vtrans.estimators.base.forward_from_generation``).

Every random draw is seeded from the run's seed and the index of an item (the z noise) or of a
batch's first item (dropout masks, sampled completions), never from a global state carried from
batch to batch: a batch gives the same scores wherever it runs, which is what lets several
processes share a run (``vtrans.estimators.distributed``). ``vtrans evaluate``, ``vtrans score``,
``vtrans crossval`` and the benchmarks all run estimators through :class:`Runner`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from vtrans import log
from vtrans.backbone.generate import Completion, complete, generate_batch, is_correct
from vtrans.backbone.tokens import encode, target_ids
from vtrans.config import EstimatorConfig
from vtrans.data import IdiomItem, render_prompt
from vtrans.estimators import distributed
from vtrans.estimators.base import Context, device_rng, forward_from_generation, item_seed, run_forward
from vtrans.estimators.distributed import Shard
from vtrans.estimators.plan import Plan, runnable, sync


class Completer:
    """The base model's completions of prompts, batch by batch: step 1 of the runner, no estimator yet."""

    def __init__(
        self, backbone, config: EstimatorConfig | None = None, progress: bool = True, shard: Shard | None = None
    ) -> None:
        self.backbone = backbone
        self.config = config or EstimatorConfig()
        self.model, self.tokenizer = backbone.model, backbone.tokenizer
        self.device = next(self.model.parameters()).device
        self.shard = shard or distributed.current()
        self.progress = progress and self.shard.rank == 0

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="item", disable=not log.bars_enabled(self.progress), leave=False)

    def complete(self, prompts: list[str], start: int = 0) -> list[Completion]:
        """The base model's completions, batch by batch; a sampled batch is seeded by its first item's index."""
        cfg = self.config
        done: dict[int, list[Completion]] = {}
        with self._bar(len(prompts), "completions") as bar:
            for b, part in self.shard.batches(len(prompts), cfg.batch_size):
                done[b] = complete(
                    self.model,
                    self.tokenizer,
                    prompts[part],
                    max_new_tokens=cfg.max_new_tokens,
                    do_sample=cfg.sample,
                    temperature=cfg.temperature,
                    seed=item_seed(cfg.seed, start + part.start),
                    batch_size=cfg.batch_size,
                    answer_words=cfg.answer_words,
                )
                bar.update(len(done[b]) * self.shard.world)
        return [c for part in self.shard.merge(done) for c in part]

    def label(self, items: list[IdiomItem], template: str) -> tuple[list[str], list[Completion], list[bool]]:
        """Prompts, the base model's completions and whether each is correct."""
        prompts = [render_prompt(template, it.prefix) for it in items]
        completions = self.complete(prompts)
        k = self.config.answer_words
        correct = [is_correct(c, it.target, k) for c, it in zip(completions, items, strict=True)]
        return prompts, completions, correct


class Runner(Completer):
    """Runs the base model's completions and any set of estimators on a backbone, with or without a latent."""

    def __init__(
        self,
        backbone,
        module=None,
        config: EstimatorConfig | None = None,
        progress: bool = True,
        shard: Shard | None = None,
        members: Sequence = (),
        posteriors: Mapping[str, Any] | None = None,
    ) -> None:
        """Args:
            backbone: the base model (``vtrans.backbone.loading.Backbone``).
            module: a trained ``LatentModel`` on that backbone, or None (no latent estimators).
            config: the estimator settings.
            progress: show progress bars (rank 0 only).
            shard: this process's share of the batches (default: the running process group's,
                see ``vtrans.estimators.distributed``); every rank ends with the whole run's results.
            members: an ensemble's latents on the same backbone, ``module`` first (the ensemble family's).
            posteriors: what was fitted on ``module`` after its training (``Context.posteriors``).
        """
        super().__init__(backbone, config, progress, shard)
        self.module, self.members, self.posteriors = module, tuple(members), dict(posteriors or {})
        self._plans: dict[tuple[str, ...], Plan] = {}  # names asked for -> what they run: checked once

    def runnable(self, names: Sequence[str]) -> list[str]:
        """``names`` that apply here (latent, prior, aggregate), a fitted one replaced by the
        estimators that give its features (``registry.computed``)."""
        return runnable(names, self.module, self.config.aggregate, len(self.members), tuple(self.posteriors))

    def _plan(self, names: Sequence[str]) -> Plan:
        key = tuple(names)
        if key not in self._plans:
            self._plans[key] = Plan.of(self.runnable(names), self.config.aggregate)
        return self._plans[key]

    @torch.no_grad()
    def scores(
        self,
        prompts: list[str],
        completions: list[Completion],
        names: Sequence[str],
        gold: list[str] | None = None,
        start: int = 0,
        seconds: dict[str, float] | None = None,
        indices: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every runnable estimator of ``names`` on completions already made.

        Args:
            gold: the idioms' target words: adds ``lens_ce_gold_by_layer`` (analysis only).
            start: the index of the first prompt in the whole run (the seed of its draws).
            indices: each prompt's index in the whole run, where they are not ``start, start + 1, ...``
                (a fold's items among all of a cross-fitted run's).
            seconds: accumulates the time of the shared forward and its reads (``shared``) and of
                each family that adds passes (its name).

        Returns:
            ``{name: (n,) tensor}`` on the CPU, plus the per-item fields of the families that ran
            (``Family.fields``: the lens's ``lens_ce_by_layer`` and, with ``gold``,
            ``lens_ce_gold_by_layer``, (n, L+1)).
        """
        plan = self._plan(names)
        gold_ids = None
        if gold is not None:
            gold_ids = [ids[0] if ids else 0 for ids in target_ids(self.tokenizer, list(gold))]
        seconds = {} if seconds is None else seconds
        indices = list(range(start, start + len(prompts))) if indices is None else list(indices)
        done: dict[int, dict[str, torch.Tensor]] = {}
        with self._bar(len(prompts), "scores") as bar, plan.attention(self.model):
            for b, part in self.shard.batches(len(prompts), self.config.batch_size):
                chunk = completions[part]
                context = self._context(prompts[part], chunk, indices[part])
                t0 = time.perf_counter()
                enc = encode(self.tokenizer, prompts[part], plan.targets(chunk), self.device)
                forward = None
                if plan.forward_needed:
                    gold_part = None if gold_ids is None else torch.tensor(gold_ids[part], device=self.device)
                    forward = run_forward(self.model, enc, **plan.kept, gold=gold_part)
                seconds["shared"] = seconds.get("shared", 0.0) + time.perf_counter() - t0
                done[b] = plan.read(forward, context, seconds, self.device)
                del forward
                bar.update(len(chunk) * self.shard.world)
        return _concat(self.shard.merge(done))

    @torch.no_grad()
    def score_prompts(
        self, prompts: list[str], names: Sequence[str], start: int = 0
    ) -> tuple[list[Completion], dict[str, torch.Tensor]]:
        """Completions and scores for bare prompts (no target, so no labels): ``vtrans score``.

        The completions and the shared forward are one pass: ``generate`` keeps the states the
        families read (``vtrans.estimators.base.forward_from_generation``), and the scores
        equal those of :meth:`complete` followed by :meth:`scores`. ``start`` is the index of
        the first prompt in the whole run, so that a run scored in several calls draws as one
        call would.
        """
        cfg, plan = self.config, self._plan(names)
        completions: dict[int, list[Completion]] = {}
        done: dict[int, dict[str, torch.Tensor]] = {}
        seconds: dict[str, float] = {}
        with self._bar(len(prompts), "scores") as bar, plan.attention(self.model):
            for b, part in self.shard.batches(len(prompts), cfg.batch_size):
                with device_rng(self.device):
                    torch.manual_seed(item_seed(cfg.seed, start + part.start))
                    chunk, generation = generate_batch(
                        self.model,
                        self.tokenizer,
                        prompts[part],
                        cfg.max_new_tokens * cfg.answer_words,
                        cfg.sample,
                        cfg.temperature,
                        logits=plan.forward_needed,
                        answer_words=cfg.answer_words,
                        **plan.kept,
                    )
                forward = None
                if plan.forward_needed:
                    enc = encode(self.tokenizer, prompts[part], plan.targets(chunk), self.device)
                    forward = forward_from_generation(self.model, generation, enc, cache=plan.kept["cache"])
                del generation
                context = self._context(prompts[part], chunk, list(range(start + part.start, start + part.stop)))
                completions[b], done[b] = chunk, plan.read(forward, context, seconds, self.device)
                del forward
                bar.update(len(chunk) * self.shard.world)
        return [c for part in self.shard.merge(completions) for c in part], _concat(self.shard.merge(done))

    def _context(self, prompts: list[str], completions: list[Completion], indices: list[int]) -> Context:
        return Context(
            self.model, self.module, self.tokenizer, self.config, prompts, completions, indices, self.members, self.posteriors
        )

    @torch.no_grad()
    def plain_forward_seconds(self, prompts: list[str], completions: list[Completion]) -> float:
        """The unit of cost: a plain Hugging Face forward over the same batches (ŷ after each prompt; this rank's)."""
        start = time.perf_counter()
        for _, part in self.shard.batches(len(prompts), self.config.batch_size):
            enc = encode(self.tokenizer, prompts[part], [[c.first_token] for c in completions[part]], self.device)
            self.model(**enc.inputs)
        sync(self.device)
        return time.perf_counter() - start


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in (parts[0] if parts else {})}
