"""Labelled items through the runner: their completions, labels and scores, timed, and what each estimator costs.

An item is wrong (error = 1) when the base model's completion word differs from the idiom's last
word. Every estimator scores the same items through the runner (``vtrans.estimators.runner``):
one shared forward per batch for the single-pass estimators, and the passes of their own that MC
dropout, ``latent_mi`` and the sampled completions add, each timed; a plain forward on the same
batches is the unit of cost (:func:`costs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtrans.backbone.generate import Completion
from vtrans.data import IdiomItem
from vtrans.estimators import registry
from vtrans.estimators.base import Family
from vtrans.estimators.registry import family_of
from vtrans.estimators.runner import Runner
from vtrans.log import phase


@dataclass
class Scored:
    """Completions, labels and every estimator's scores for a list of items."""

    items: list[IdiomItem]
    prompts: list[str]
    completions: list[Completion]
    correct: list[bool]
    scores: dict[str, torch.Tensor]
    seconds: dict[str, float]


def complete_items(
    runner: Runner, items: list[IdiomItem], template: str
) -> tuple[list[str], list[Completion], list[bool]]:
    """``runner.label``: prompts, completions and whether each is correct, as one phase on stderr."""
    with phase("completing", "completed {n} prompts: {wrong} wrong") as said:
        prompts, completions, correct = runner.label(items, template)
        said.update(n=len(correct), wrong=len(correct) - sum(correct))
    return prompts, completions, correct


def score_items(
    runner: Runner,
    items: list[IdiomItem],
    names: list[str],
    template: str,
    gold: bool = True,
    labelled: tuple[list[str], list[Completion], list[bool]] | None = None,
) -> Scored:
    """Completions, labels and the scores of ``names`` (a fitted one's features for it), timed.

    ``scores`` holds each name's (n,) scores and the per-item fields of the families that ran
    (``lens_ce_by_layer``, ...).

    ``seconds`` holds ``forward`` (a plain forward over the same batches: the unit of cost),
    ``shared`` (the one forward every single-pass estimator reads, with their reads) and the
    seconds of each family that adds passes. ``labelled``: the items' :func:`complete_items`,
    when already done.
    """
    prompts, completions, correct = labelled or complete_items(runner, items, template)
    with phase("scoring", "scored {n} items") as said:
        said["n"] = len(items)
        seconds = {"forward": runner.plain_forward_seconds(prompts, completions)}
        tensors = runner.scores(
            prompts, completions, names, gold=[it.target for it in items] if gold else None, seconds=seconds
        )
    return Scored(items, prompts, completions, correct, tensors, seconds)


def _seconds_of(families: list[Family], seconds: dict[str, float], names: list[str]) -> float:
    """The shared forward once if any of ``names`` (of ``families``) reads it, plus the passes each family adds."""
    total = seconds.get("shared", float("nan")) if any(f.reads_forward_of(names) for f in families) else 0.0
    for family in families:
        if family.extra_passes:
            total += seconds.get(family.name, float("nan"))
    return total


def costs(seconds: dict[str, float], names: list[str]) -> dict[str, dict[str, float]]:
    """What each estimator costs alone, in seconds and in plain forwards over the same items.

    An estimator is charged the shared forward when it reads it, plus its family's own passes;
    a fitted one what the families of its features cost plus its fit (``{family}_fit``: its
    training items' completions, features and the fit itself).
    """
    forward = max(seconds["forward"], 1e-9)
    result = {}
    for name in names:
        family = family_of(name)
        if family.fitted is None:  # a family that reads a posterior fitted after training is charged its fit too
            total = _seconds_of([family], seconds, [name]) + seconds.get(f"{family.name}_fit", 0.0)
        else:
            writers = [registry.writer_of(k) for k in family.fitted.features]
            sources = list({id(f): f for f in map(family_of, writers)}.values())
            total = _seconds_of(sources, seconds, writers) + seconds.get(f"{family.name}_fit", float("nan"))
        result[name] = {"seconds": total, "cost_forward_equiv": total / forward}
    return result
