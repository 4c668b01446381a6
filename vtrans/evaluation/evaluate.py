"""The comparative run: one set of completions, one set of labels, every estimator, the same metrics.

1. The base model (latent off) completes every prompt; an item is wrong (error = 1) when the
   completion word differs from the idiom's last word.
2. Every estimator scores the same items through the runner (``vtrans.estimators.runner``): one shared
   forward per batch for the single-pass estimators, and the passes of their own that MC
   dropout, ``latent_mi`` and the sampled completions add, each timed; a plain forward on the
   same batches is the unit of cost.
3. Metrics with bootstrap intervals, a paired comparison against the best cheap baseline, the
   files of the contract (results.json, scores.jsonl, report.md) and the plots.

Before any work, the run says on stderr (``vtrans.log``) what it will evaluate: the items loaded,
those left out as seen in the latent's training, the n that remains, and a warning when n is too
small for the AUROC intervals to separate estimators (:func:`auroc_half_width`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vtrans.backbone.generate import Completion
from vtrans.backbone.loading import Backbone
from vtrans.config import EvalConfig
from vtrans.data import (
    DataError,
    IdiomItem,
    _idiom_key,
    idiom_hash,
    load_split,
    parse_spec,
)
from vtrans.errors import ConfigError
from vtrans.estimators import distributed, registry
from vtrans.estimators.base import Family
from vtrans.estimators.registry import chosen, family_of, why_not
from vtrans.estimators.runner import Runner
from vtrans.evaluation import report
from vtrans.log import log, phase

# A 95% AUROC interval narrower than ±0.05 keeps two estimators 0.1 apart from overlapping; a
# wider one cannot separate even that (a large gap: cheap baselines usually lie closer).
SEPARATING_HALF_WIDTH = 0.05
# the AUROC at which the expected interval is quoted: a useful estimator, far from perfect
TYPICAL_AUROC = 0.75


class Unfittable(ValueError):
    """A fitted estimator has nothing to learn from: no training items, or all of one class."""


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


def features_of(family: Family, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of ``scores`` that a fitted family reads (its ``features`` that were computed)."""
    return {key: scores[key] for key in family.features if key in scores}


def fit_features(runner: Runner, family: Family, prompts: list[str], completions: list[Completion]) -> dict[str, torch.Tensor]:
    """A fitted family's features of items: one shared forward per batch (nothing here is timed)."""
    return features_of(family, runner.scores(prompts, completions, [family.names[0]]))


def _seconds_of(families: list[Family], seconds: dict[str, float]) -> float:
    """The shared forward once if any of ``families`` reads it, plus the passes each adds."""
    total = seconds.get("shared", float("nan")) if any(f.reads_forward for f in families) else 0.0
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
        if family.fit is None:  # a family fitted after training (the Laplace posterior) is charged its fit too
            total = _seconds_of([family], seconds) + seconds.get(f"{family.name}_fit", 0.0)
        else:
            sources = list({id(f): f for f in (family_of(registry.writer_of(k)) for k in family.features)}.values())
            total = _seconds_of(sources, seconds) + seconds.get(f"{family.name}_fit", float("nan"))
        result[name] = {"seconds": total, "cost_forward_equiv": total / forward}
    return result


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
        predict = family.fit(fit_features(runner, family, prompts, completions), errors)
    except ValueError as err:
        raise Unfittable(str(err)) from None
    return predict(features_of(family, evaluated.scores))


def fit_items(
    evaluated: list[IdiomItem], trained_with: dict | None = None, trained: set[str] | None = None
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
    evaluated_keys = {_idiom_key(it.idiom) for it in evaluated}
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
            excluded = {_idiom_key(it.idiom) for it in load_split(spec, "train", **split)}
        except DataError as err:
            raise Unfittable(f"the checkpoint's training data cannot be read: {err}") from None
    trained = trained or set()
    items = [
        it
        for it in candidates
        if _idiom_key(it.idiom) not in evaluated_keys | excluded and idiom_hash(it.idiom) not in trained
    ]
    return items, source


def split_settings(config: EvalConfig, recorded: dict | None = None) -> dict:
    """The split to evaluate with: ``load_split``'s ``seed``, ``val_fraction`` and ``test_fraction``.

    Args:
        config: its ``split_seed``, ``val_fraction`` and ``test_fraction``, where set.
        recorded: the checkpoint's (``vtrans.latent.checkpoint.split_settings``): they apply where the
            config sets none, so that ``builtin:test`` is the test split the latent was kept from.

    Raises:
        ConfigError: a setting given in ``config`` that differs from the checkpoint's.
    """
    recorded = recorded or {}
    given = {"seed": config.split_seed, "val_fraction": config.val_fraction, "test_fraction": config.test_fraction}
    defaults = {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.15}
    for key, value in given.items():
        if value is not None and key in recorded and value != recorded[key]:
            name = "split_seed" if key == "seed" else key
            raise ConfigError(
                f"{name}={value} differs from the checkpoint's {key}={recorded[key]}: its training idioms would "
                f"fall into the evaluated split; leave {name} unset to split as the latent was trained"
            )
    return {key: value if value is not None else recorded.get(key, defaults[key]) for key, value in given.items()}


def leave_out_seen(
    items: list[IdiomItem], trained: set[str] | None, keep: bool, data: str
) -> tuple[list[IdiomItem], int | None]:
    """The items to evaluate and how many of them the latent was trained on.

    Args:
        items: the evaluated items.
        trained: the checkpoint's training idioms (``vtrans.latent.checkpoint.trained_idiom_hashes``);
            None when it does not record them (nothing is left out).
        keep: keep the seen items (``keep_seen``).
        data: the data spec, for the error message.

    Raises:
        ConfigError: every item is one the latent was trained on, and ``keep`` is off.
    """
    if trained is None:
        return items, None
    unseen = [it for it in items if idiom_hash(it.idiom) not in trained]
    seen = len(items) - len(unseen)
    if keep:
        return items, seen
    if not unseen:
        raise ConfigError(
            f"all {seen} idioms of {data} were in the latent's training data: evaluate it on idioms it has "
            "not seen (or --keep_seen to score them anyway)"
        )
    return unseen, seen


def auroc_half_width(n: int, error_rate: float = 0.5, auroc: float = TYPICAL_AUROC, z: float = 1.96) -> float:
    """The expected half-width of a 95% interval of an AUROC measured on ``n`` items.

    Hanley and McNeil (1982, Radiology 143:29-36) give the sampling variance of an AUROC ``A``
    measured on ``n1`` errors and ``n0`` correct items::

        Var(A) = (A (1 - A) + (n1 - 1)(Q1 - A**2) + (n0 - 1)(Q2 - A**2)) / (n1 n0)
        Q1 = A / (2 - A),   Q2 = 2 A**2 / (1 + A)

    (``Q1``, ``Q2``: the chance that two random errors both outscore one correct item, and one
    error two correct items; the closed forms hold for exponentially distributed scores and are
    close for others). Here ``n1 = error_rate * n``, ``n0 = n - n1``, and the half-width is
    ``z * sqrt(Var)``. At a given n it is within a few percent of its smallest near
    ``error_rate = 0.5`` (the smallest lies a little above), so the default is close to the best
    case before any completion is known. It shrinks as ``A`` nears 1 and as ``1/sqrt(n)``. The
    percentile-bootstrap intervals of :func:`vtrans.evaluation.metrics.bootstrap_ci` come out close to it
    (``tests/test_evaluate.py`` checks both against synthetic data).

    Args:
        n: items scored.
        error_rate: fraction of them the model completes wrongly.
        auroc: the AUROC at which to quote the width.
        z: the normal quantile of the interval (1.96: 95%).

    Returns:
        The half-width; ``inf`` when either class has fewer than one item (no AUROC at all).
    """
    n1 = error_rate * n
    n0 = n - n1
    if n1 < 1 or n0 < 1:
        return math.inf
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
    return z * math.sqrt(variance)


def _announce(config: EvalConfig, ckpt: str | None, loaded: int, seen: int | None, n: int) -> bool:
    """Say on stderr what will be evaluated, before any work; returns whether n was too small.

    One line: the items loaded, those left out as seen in the latent's training, the n that
    remains; warnings when the checkpoint cannot be checked for them, when they are kept, and
    when even a balanced n gives AUROC intervals too wide to separate estimators.
    """
    kind, arg = parse_spec(config.data)
    split = (arg if kind == "builtin" else None) or config.split
    parts = [f"loaded {loaded} items of {config.data} (split {split})"]
    left_out = seen if seen and not config.keep_seen else 0
    if left_out:
        parts.append(
            f"left out {left_out} of {loaded} idioms the latent was trained on (--keep_seen keeps them)"
        )
    if n < loaded - left_out:
        parts.append(f"the first {n} kept (--max_items)")
    log.info("; ".join([*parts, f"n = {n} to evaluate"]))
    if ckpt is not None and seen is None:
        log.warning("the checkpoint does not record its training idioms: cannot leave them out")
    elif seen and config.keep_seen:
        log.warning(
            f"kept {seen} idioms the latent was trained on (--keep_seen): "
            "their latent scores are in-sample"
        )
    width = auroc_half_width(n)
    if width > SEPARATING_HALF_WIDTH:
        log.warning(
            f"n = {n} is too small for the AUROC intervals to separate estimators: "
            f"at AUROC {TYPICAL_AUROC} a 95% interval is about ±{width:.2f} wide even with half "
            f"the completions wrong (±{SEPARATING_HALF_WIDTH} would separate two estimators 0.1 apart)"
        )
        return True
    return False


def _warn_if_wide(correct: list[bool], warned: bool) -> None:
    """Warn when the completions leave no AUROC to measure (one class only), or, unless ``warned``
    already of a small n, when their error rate makes the AUROC intervals too wide."""
    n, wrong = len(correct), len(correct) - sum(correct)
    width = auroc_half_width(n, wrong / n)
    if math.isinf(width):
        which = "wrong" if wrong else "right"
        log.warning(f"all {n} completions are {which}: no AUROC can be measured")
    elif width > SEPARATING_HALF_WIDTH and not warned:
        log.warning(
            f"{wrong} of {n} completions are wrong: at AUROC {TYPICAL_AUROC} a 95% interval "
            f"is about ±{width:.2f} wide, too wide to separate estimators "
            f"(±{SEPARATING_HALF_WIDTH} would separate two 0.1 apart)"
        )


def evaluate(
    config: EvalConfig,
    out_dir: str | Path,
    ckpt: str | None = None,
    model: str | None = None,
    device: str | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
) -> dict:
    """Run the comparison and write the contract's files into ``out_dir``; returns results.json's content.

    Args:
        config: the data, estimator and report settings.
        out_dir: where the files go.
        ckpt: a trained latent: a checkpoint, or a folder written by ``save_pretrained``; without
            it only the estimators that need no latent run.
        model: the base model by name (``vtrans.backbone.loading.Backbone``'s ``name``; default ``smollm2``),
            when no ``ckpt`` names it and no ``backbone`` is given.
        device: ``cpu``, ``cuda`` or ``cuda:N``; default: where the ``backbone`` given is, else ``cpu``.
        progress: progress bars on stderr.
        backbone: the base model, loaded (``Backbone.from_model`` wraps a model in memory): nothing
            is loaded by name; a ``ckpt`` must have been trained on it (fingerprints equal).

    Raises:
        ConfigError: both ``model`` and ``backbone`` given, too few items, settings that differ
            from the checkpoint's.
        CheckpointError: a ``ckpt`` that is unreadable or of another base model.
    """
    from vtrans.latent import checkpoint

    if backbone is not None and model is not None:
        raise ConfigError(f"give the base model by name (model={model!r}) or loaded (backbone=), not both")
    if device is None:
        device = "cpu" if backbone is None else str(backbone.device)
    else:
        device = distributed.rank_device(device, distributed.current())

    out = Path(out_dir)
    config = replace(config, estimators=chosen(config.estimators))
    split = split_settings(config, checkpoint.split_settings(ckpt) if ckpt is not None else None)
    items = load_split(config.data, config.split, **split)
    trained = checkpoint.trained_idiom_hashes(ckpt) if ckpt is not None else None
    checked = len(items)
    items, seen = leave_out_seen(items, trained, config.keep_seen, config.data)
    if config.max_items:
        items = items[: config.max_items]
    if len(items) < 2:
        raise ConfigError(f"{config.data} ({config.split}) has {len(items)} item(s): need at least 2 to evaluate")
    too_few = _announce(config, ckpt, checked, seen, len(items))
    with phase("loading the model", "loaded {model}") as said:
        if ckpt is not None:
            module = checkpoint.load(ckpt, device=device, backbone=backbone)
            backbone = module.backbone
        else:
            module, backbone = None, (backbone or Backbone(model or "smollm2")).to(device)
        model_name = backbone.label  # "... (random weights)" where they are
        said["model"] = model_name if ckpt is None else f"{model_name} and the latent of {Path(ckpt).name}"
    dropped: dict[str, str] = {}  # estimators asked for but not run, and why
    for name in config.estimators:
        why = why_not(name, module, config.aggregate)
        if why is not None:
            dropped[name] = why
    names = [n for n in config.estimators if n not in dropped]
    runner = Runner(backbone, module, config, progress)
    labelled = complete_items(runner, items, config.template)
    _warn_if_wide(labelled[2], warned=too_few)
    # every row of scores.jsonl carries the families' per-item fields (the lens's trajectory)
    scored = score_items(runner, items, registry.with_fields(names), config.template, labelled=labelled)
    fits = {}  # which items each fitted family was fitted on
    for name in registry.fitted(names):
        family, start = family_of(name), time.perf_counter()
        try:
            trained_with = None if ckpt is None else checkpoint.read(ckpt).get("datamodule_hyper_parameters", {})
            train_items, source = fit_items(items, trained_with, trained)
            fits[f"{family.name}_fit"] = {"source": source, "n": len(train_items)}
            if not train_items:
                raise Unfittable(f"no item of {source} is left to fit it on once the evaluated ones are out")
            log.info(f"fitting {name} on {len(train_items)} items of {source}: completing them first")
            with phase(f"fitting {name}", f"fitted {name}"):
                scored.scores[name] = fit_scores(runner, family, train_items, scored, config.template)
        except Unfittable as err:
            names.remove(name)
            dropped[name] = f"cannot be fitted: {err}"
        scored.seconds[f"{family.name}_fit"] = time.perf_counter() - start
    rows = _rows(scored, names)
    cost = costs(scored.seconds, names)
    extra = {
        "config": asdict(config),
        "ckpt": ckpt,
        "latent": None if module is None else dict(module.hparams),
        "seconds": scored.seconds,
        "dropped": dropped,
        "split": split,
        "seen": seen,  # items of the data whose idiom the latent was trained on (None: not checked)
        "seen_of": checked,
        "seen_left_out": None if seen is None else (0 if config.keep_seen else seen),
        "keep_seen": config.keep_seen,
    }
    extra.update(fits)
    results = report.build_results(
        model_name, rows, cost, n_boot=config.n_boot, seed=config.seed, extra=extra, random_weights=backbone.random_weights
    )
    if runner.shard.rank == 0:  # under a process group every rank holds the results; one writes them
        out.mkdir(parents=True, exist_ok=True)
        report.write_scores_jsonl(out / "scores.jsonl", rows)
        report.write_results_json(out / "results.json", results)
        plots = report.plot_all(out, rows, results)
        report.write_report_md(out / "report.md", results, plots)
    return results


def _rows(scored: Scored, names: list[str]) -> list[dict]:
    fields = [key for key in registry.fields() if key in scored.scores]
    return [
        report.item_row(
            item,
            prompt,
            comp,
            ok,
            {n: float(scored.scores[n][i]) for n in names if n in scored.scores},
            {key: scored.scores[key][i].tolist() for key in fields},
        )
        for i, (item, prompt, comp, ok) in enumerate(
            zip(scored.items, scored.prompts, scored.completions, scored.correct, strict=True)
        )
    ]
