"""Fitted estimators (the registry's fitted families: the probe): their features, the items they
are fitted on, and their scores of the evaluated items.

A fitted estimator is fitted on items disjoint from the evaluated ones and out-of-sample for
every learned part that produces its features (:func:`fit_items`); it is charged what its
features cost plus its fit (``vtrans.evaluation.scored.costs``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vtrans.backbone.generate import Completion
from vtrans.data import DataError, IdiomItem, idiom_hash, load_split, with_answer_words
from vtrans.data.items import idiom_key
from vtrans.estimators.base import Family
from vtrans.estimators.runner import Runner
from vtrans.evaluation.scored import complete_items

if TYPE_CHECKING:
    from vtrans.evaluation.scored import Scored


class Unfittable(ValueError):
    """A fitted estimator has nothing to learn from: no training items, or all of one class."""


def features_of(family: Family, scores: dict[str, torch.Tensor], targets: bool = False) -> dict[str, torch.Tensor]:
    """The keys of ``scores`` that a fitted family reads (its ``features`` that were computed and,
    with ``targets``, its targets: what it reads of the items it is fitted on)."""
    keys = (*family.fitted.features, *(family.fitted.targets if targets else ()))
    return {key: scores[key] for key in keys if key in scores}


def fit_features(runner: Runner, family: Family, prompts: list[str], completions: list[Completion]) -> dict[str, torch.Tensor]:
    """A fitted family's features and targets of the items it is fitted on (nothing here is timed)."""
    names = [family.names[0], *family.fitted.targets]
    return features_of(family, runner.scores(prompts, completions, names), targets=True)


def fit_scores(runner: Runner, family: Family, train_items: list[IdiomItem], evaluated: Scored, template: str) -> torch.Tensor:
    """A fitted family's scores of the evaluated items, fitted on ``train_items`` only.

    The training items are completed and labelled first; their features are computed only when
    both classes are present.

    Raises:
        Unfittable: the base model's completions of the training items are all right or all
            wrong, or the family's ``fit`` finds nothing to learn.
    """
    prompts, completions, correct = complete_items(runner, train_items, template)
    n_right = sum(correct)
    if n_right in (0, len(correct)):
        raise Unfittable(
            f"the base model completes {n_right} of its {len(correct)} training items correctly: "
            f"{family.name} needs both right and wrong ones"
        )
    errors = torch.tensor([not c for c in correct], dtype=torch.float32)
    try:
        predict = family.fitted.fit(fit_features(runner, family, prompts, completions), errors)
    except ValueError as err:
        raise Unfittable(str(err)) from None
    return predict(features_of(family, evaluated.scores))


def fit_items(
    evaluated: list[IdiomItem],
    trained_with: dict | None = None,
    trained: set[str] | None = None,
    answer_words: int = 1,
) -> tuple[list[IdiomItem], str]:
    """The items a fitted estimator is fitted on, and where they come from.

    The rule: items (a) disjoint from the evaluated ones (normalised idioms) and (b) out-of-sample
    for every learned part that produces its features, so that its features behave at fitting as
    they do on the evaluated items.

    * With a checkpoint (``trained_with``: its ``datamodule_hyper_parameters``): the validation
      split of the data the latent was trained on, split with the seed and fractions it was
      trained with (idioms held out from its training), less any idiom of that training split
      (a ``builtin:SPLIT`` spec serves one split to every stage) and less any evaluated idiom.
      Not the train split: there posterior_var and latent_kl are in-sample for the latent.
    * Without one (no learned features): the built-in train and val splits less any evaluated idiom.

    So a fitted estimator runs on any data, a user's file included. ``trained`` (the checkpoint's recorded
    training idioms, as hashes) is left out too, whatever its data spec says: a latent trained on
    chosen items (``vtrans crossval``) records a spec that does not describe them.

    Returns:
        The items (possibly none) and a short description of their source.

    Raises:
        Unfittable: the checkpoint does not record its training data, or it cannot be read.
    """
    evaluated_keys = {idiom_key(it.idiom) for it in evaluated}
    if trained_with is None:
        source = "builtin:train+val"
        candidates = load_split("builtin", "train") + load_split("builtin", "val")
        excluded: set[str] = set()
    else:
        if not isinstance(trained_with.get("data"), str):
            raise Unfittable("the checkpoint does not record the data its latent was trained on")
        spec = trained_with["data"]
        split = {k: trained_with[k] for k in ("seed", "val_fraction", "test_fraction") if k in trained_with}
        source = f"the val split of {spec} (seed {split.get('seed', 0)}), held out from the checkpoint's training"
        try:
            candidates = load_split(spec, "val", **split)
            excluded = {idiom_key(it.idiom) for it in load_split(spec, "train", **split)}
        except DataError as err:
            raise Unfittable(f"the checkpoint's training data cannot be read: {err}") from None
    trained = trained or set()
    items = [
        it
        for it in candidates
        if idiom_key(it.idiom) not in evaluated_keys | excluded and idiom_hash(it.idiom) not in trained
    ]
    return with_answer_words(items, answer_words)[0], source


def cross_fitted(
    family: Family, scores: dict[str, torch.Tensor], correct: list[bool], folds: list[int], k: int
) -> torch.Tensor:
    """A fitted family's scores: fold f's fit is on the other folds' items (their own out-of-fold
    features), NaN for a fold whose outside is all of one class."""
    features = features_of(family, scores, targets=True)
    scored = family.fitted.features
    errors = torch.tensor([not c for c in correct], dtype=torch.float32)
    assigned = torch.tensor(folds)
    result = torch.full((len(correct),), float("nan"))
    for fold in range(k):
        inside = assigned == fold
        try:
            predict = family.fitted.fit({key: value[~inside] for key, value in features.items()}, errors[~inside])
        except ValueError:  # all of one class outside this fold: nothing fitted for it
            continue
        result[inside] = predict({key: value[inside] for key, value in features.items() if key in scored})
    return result
