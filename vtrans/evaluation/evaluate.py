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
small for the AUROC intervals to separate estimators (``vtrans.evaluation.items``). The items'
completions, labels and scores are ``vtrans.evaluation.scored``'s; a fitted estimator's fit,
``vtrans.evaluation.fitted``'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from vtrans.backbone.loading import Backbone
from vtrans.config import EvalConfig
from vtrans.data import DEFAULT_TEMPLATE, idiom_hash, load_split, with_answer_words
from vtrans.errors import ConfigError
from vtrans.estimators import distributed, registry
from vtrans.estimators.registry import chosen, family_of, why_not
from vtrans.estimators.runner import Runner
from vtrans.evaluation import report
from vtrans.evaluation.fitted import Unfittable, fit_items, fit_scores
from vtrans.evaluation.items import _announce, _warn_if_wide, leave_out_seen, split_settings
from vtrans.evaluation.scored import Scored, complete_items, costs, score_items
from vtrans.latent.calibration import Calibration
from vtrans.log import log, phase


def evaluate(
    config: EvalConfig,
    out_dir: str | Path,
    ckpt: str | None = None,
    model: str | None = None,
    device: str | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
    template: str | None = None,
) -> dict:
    """Run the comparison and write the contract's files into ``out_dir``; returns results.json's content.

    Args:
        config: the data, estimator and report settings.
        out_dir: where the files go.
        ckpt: a trained latent: a checkpoint, or a folder written by ``save_pretrained``; without
            it only the estimators that need no latent run. It is read once.
        model: the base model by name (``vtrans.backbone.loading.Backbone``'s ``name``; default ``smollm2``),
            when no ``ckpt`` names it and no ``backbone`` is given.
        device: ``cpu``, ``cuda`` or ``cuda:N``; default: where the ``backbone`` given is, else ``cpu``.
        progress: progress bars on stderr.
        backbone: the base model, loaded (``Backbone.from_model`` wraps a model in memory): nothing
            is loaded by name; a ``ckpt`` must have been trained on it (fingerprints equal).
        template: ``ckpt``: the template the checkpoint records (the built-in one if it records
            none, or without a checkpoint); a template: that one; None: ``config.template``.

    Raises:
        ConfigError: both ``model`` and ``backbone`` given, too few items, settings that differ
            from the checkpoint's.
        CheckpointError: a ``ckpt`` that is unreadable or of another base model.
    """
    from vtrans.latent import checkpoint

    if backbone is not None and model is not None:
        raise ConfigError(f"give the base model by name (model={model!r}) or loaded (backbone=), not both")
    contents = checkpoint.read(ckpt) if ckpt is not None else None
    config = _settings(config, contents, template)
    items, split, trained, seen, checked, too_few = _items(config, ckpt, contents)
    module, backbone = _load(ckpt, contents, model, backbone, _device(device, backbone))
    names, dropped = _runnable(config.estimators, module, config.aggregate)
    runner = Runner(backbone, module, config, progress)
    labelled = complete_items(runner, items, config.template)
    _warn_if_wide(labelled[2], warned=too_few)
    # every row of scores.jsonl carries the families' per-item fields (the lens's trajectory)
    scored = score_items(runner, items, registry.with_fields(names), config.template, labelled=labelled)
    trained_with = None if contents is None else contents.get("datamodule_hyper_parameters", {})
    fits = _fit(runner, scored, names, dropped, items, config.template, trained_with, trained)
    calibration = _own_calibration(module, items, config.answer_words)
    rows = report.with_p_wrong(_rows(scored, names, backbone.tokenizer), calibration)
    extra = {
        "config": asdict(config),
        "ckpt": ckpt,
        "latent": None if module is None else dict(module.settings),
        "seconds": scored.seconds,
        "dropped": dropped,
        "split": split,
        "seen": seen,  # items of the data whose idiom the latent was trained on (None: not checked)
        "seen_of": checked,
        "seen_left_out": None if seen is None else (0 if config.keep_seen else seen),
        "keep_seen": config.keep_seen,
        "p_wrong": report.p_wrong_record(rows, calibration),
        **fits,
    }
    results = report.build_results(
        backbone.label,
        rows,
        costs(scored.seconds, names),
        n_boot=config.n_boot,
        seed=config.seed,
        extra=extra,
        random_weights=backbone.random_weights,
    )
    if runner.shard.rank == 0:  # under a process group every rank holds the results; one writes them
        _write(Path(out_dir), rows, results)
    return results


def _settings(config: EvalConfig, contents: dict | None, template: str | None) -> EvalConfig:
    """The run's settings: the estimators' names expanded, the template resolved (see :func:`evaluate`)."""
    from vtrans.latent.checkpoint import template_in

    if template == "ckpt":
        template = (template_in(contents) if contents is not None else None) or DEFAULT_TEMPLATE
    trained_words = (contents or {}).get("datamodule_hyper_parameters", {}).get("answer_words", 1)
    if contents is not None and trained_words != config.answer_words:
        log.warning(
            f"the latent was trained on answers of {trained_words} word(s); these are answers of {config.answer_words} "
            f"(--answer_words {trained_words} evaluates it as it was trained)"
        )
    return replace(config, estimators=chosen(config.estimators), template=template or config.template)


def _device(device: str | None, backbone: Backbone | None) -> str:
    if device is None:
        return "cpu" if backbone is None else str(backbone.device)
    return distributed.rank_device(device, distributed.current())


def _items(config: EvalConfig, ckpt: str | None, contents: dict | None):
    """The items to evaluate, said on stderr before any work: ``(items, split, trained, seen,
    checked, too_few)``, the seen ones (those the latent trained on) left out unless kept."""
    from vtrans.latent import checkpoint

    split = split_settings(config, checkpoint.split_settings(contents) if contents is not None else None)
    items, short = with_answer_words(load_split(config.data, config.split, **split), config.answer_words)
    if short:
        log.info(f"left out {short} idioms too short for answers of {config.answer_words} words")
    trained = checkpoint.trained_idiom_hashes(contents) if contents is not None else None
    checked = len(items)
    items, seen = leave_out_seen(items, trained, config.keep_seen, config.data)
    if config.max_items:
        items = items[: config.max_items]
    if len(items) < 2:
        raise ConfigError(f"{config.data} ({config.split}) has {len(items)} item(s): need at least 2 to evaluate")
    too_few = _announce(config, ckpt, checked, seen, len(items))
    return items, split, trained, seen, checked, too_few


def _load(ckpt: str | None, contents: dict | None, model: str | None, backbone: Backbone | None, device: str):
    """``(module, backbone)``: the checkpoint's latent and its base model, or no latent and the model named."""
    from vtrans.latent import checkpoint

    with phase("loading the model", "loaded {model}") as said:
        if ckpt is not None:
            module = checkpoint.load(ckpt, device=device, backbone=backbone, ckpt=contents)
            backbone = module.backbone
        else:
            module, backbone = None, (backbone or Backbone(model or "smollm2")).to(device)
        said["model"] = backbone.label if ckpt is None else f"{backbone.label} and the latent of {Path(ckpt).name}"
    return module, backbone


def _own_calibration(module, items, answer_words: int = 1) -> Calibration | None:
    """The calibration the latent carries, to give the rows' ``p_wrong``: None without one, where
    it was fitted on answers of another length, or on some of these items (their ``p_wrong`` is
    then cross-fitted, as without a latent)."""
    calibration = None if module is None else module.calibration
    if calibration is None:
        return None
    if calibration.answer_words != answer_words:
        log.warning(
            f"the latent's calibration is of answers of {calibration.answer_words} word(s), these are of {answer_words}: "
            "p_wrong is cross-fitted over these items instead"
        )
        return None
    overlap = len({idiom_hash(it.idiom) for it in items} & set(calibration.idioms))
    if overlap:
        log.warning(
            f"the latent's calibration was fitted on {overlap} of these idioms: p_wrong is cross-fitted over "
            "these items instead (evaluate another split to test the latent's own)"
        )
        return None
    return calibration


def _runnable(names: list[str], module, aggregate: str) -> tuple[list[str], dict[str, str]]:
    """The estimators that run with this latent, and why each other one asked for does not."""
    dropped = {name: why for name in names if (why := why_not(name, module, aggregate)) is not None}
    return [n for n in names if n not in dropped], dropped


def _fit(runner, scored: Scored, names: list[str], dropped: dict, items, template: str, trained_with, trained) -> dict:
    """Each fitted family's scores, into ``scored`` (one that cannot be fitted leaves ``names`` for
    ``dropped``, saying why); returns which items each was fitted on."""
    fits = {}
    for name in registry.fitted(names):
        family, start = family_of(name), time.perf_counter()
        try:
            train_items, source = fit_items(items, trained_with, trained, runner.config.answer_words)
            fits[f"{family.name}_fit"] = {"source": source, "n": len(train_items)}
            if not train_items:
                raise Unfittable(f"no item of {source} is left to fit it on once the evaluated ones are out")
            log.info(f"fitting {name} on {len(train_items)} items of {source}: completing them first")
            with phase(f"fitting {name}", f"fitted {name}"):
                scored.scores[name] = fit_scores(runner, family, train_items, scored, template)
        except Unfittable as err:
            names.remove(name)
            dropped[name] = f"cannot be fitted: {err}"
        scored.seconds[f"{family.name}_fit"] = time.perf_counter() - start
    return fits


def _write(out: Path, rows: list[dict], results: dict) -> None:
    """results.json, scores.jsonl (its rows with ``p_wrong`` already), report.md and the plots, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_scores_jsonl(out / "scores.jsonl", rows)
    report.write_results_json(out / "results.json", results)
    plots = report.plot_all(out, rows, results)
    report.write_report_md(out / "report.md", results, plots)


def _rows(scored: Scored, names: list[str], tokenizer=None) -> list[dict]:
    """scores.jsonl's rows; where a family wrote per-token values, each row has the answer's tokens
    (``answer_tokens``, as text) beside them."""
    fields = [key for key in (*registry.fields(), *registry.tokens()) if key in scored.scores]
    per_token = tokenizer is not None and any(key in registry.tokens() for key in fields)

    def answer(comp) -> dict:
        return {"answer_tokens": [tokenizer.decode([t]) for t in comp.word_ids]} if per_token else {}

    return [
        report.item_row(
            item,
            prompt,
            comp,
            ok,
            {n: float(scored.scores[n][i]) for n in names if n in scored.scores},
            {**answer(comp), **{key: registry.per_item(key, scored.scores[key][i]) for key in fields}},
        )
        for i, (item, prompt, comp, ok) in enumerate(
            zip(scored.items, scored.prompts, scored.completions, scored.correct, strict=True)
        )
    ]
