"""Cross-fitted comparison: every idiom gets a score from a latent that never trained on it.

The items are cut into K folds by idiom (:mod:`vtrans.evaluation.folds`). For each training seed and each
fold f, a latent is trained on the idioms outside f (plus any ``extra_train`` idioms, with the
scored idioms and their variants taken out) and scores the idioms of f. Every item thus has an
out-of-fold latent score, and the metrics, bootstrap intervals and paired tests run over all n
items instead of one small test split.

Each fold's latent is trained as ``train.py fit`` trains one from the same YAML
(:class:`vtrans.evaluation.folds.FoldLatents`).

What does not depend on the latent runs once: the base model's completions and labels (greedy,
so seed-free) and the deterministic single-pass families. The stochastic families (MC dropout,
sampled completions, the z draws) are repeated per seed, so the spread across seeds covers
training and sampling noise; folds stay fixed across seeds.

A fitted estimator (the registry's fitted families: the probe) is cross-fitted too: for fold f
it is fitted on the items outside f, each with the latent features of its *own* fold's latent
(out-of-sample for that latent), and it scores the items of f with the features of f's latent.
Every feature row it sees, in fitting or in scoring, is thus out-of-sample for the latent that
produced it, so fitting and scoring see the same feature distribution; no error label of fold f
enters its fit.

A run resumes. Its units are recorded under ``OUT/units/`` as each finishes
(:class:`vtrans.evaluation.units.Units`): ``base`` (the completions, labels and seed-free scores),
``seed{s}`` (that seed's stochastic scores), ``seed{s}-fold{f}`` (the latent trained without
fold f, kept beside it as ``seed{s}-fold{f}.ckpt``, with ``--ensemble M`` the M − 1 other members
as ``seed{s}-fold{f}-member{m}.ckpt``, and its scores of fold f) and, for each
fitted family, ``seed{s}-{family}`` (``seed{s}-probe``). The same command on the same ``--out``
reads the finished units and computes the others; one with other settings is refused, but
one with other seeds is not (each seed's units are its own): a run extends by more seeds. The files
are assembled from the units alone, each unit's recorded seconds included, so a resumed run writes
the results an uninterrupted one does (``vtrans.evaluation.crossval_results``).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from vtrans.backbone.generate import Completion
from vtrans.config import CrossvalConfig, EvalConfig
from vtrans.data import IdiomItem, render_prompt
from vtrans.errors import ConfigError, UserError
from vtrans.estimators import registry
from vtrans.estimators.base import Family, PosteriorData
from vtrans.estimators.registry import NAMES, chosen, family_of
from vtrans.estimators.runner import Runner
from vtrans.evaluation.crossval_results import Labels, assemble, write
from vtrans.evaluation.fitted import cross_fitted
from vtrans.evaluation.folds import FoldLatents, FoldPlan, assign_folds
from vtrans.evaluation.units import Units
from vtrans.latent import refit
from vtrans.latent.training import read_training_config
from vtrans.log import log


def config_digest(path: str | Path) -> str:
    """A training YAML's content, as a run's manifest records it: the digest of its bytes as they are
    (no newline translation), so that an edited config is a different run."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _held_out_posterior(name: str) -> bool:
    """Reads a posterior fitted on idioms held out from the latent's training: only a run with
    ``refit_spread`` holds some out."""
    posterior = family_of(name).posterior
    return posterior is not None and posterior.held_out


def _seed_free(name: str) -> bool:
    """Read off the shared forward alone, with no latent: the same for every seed, so run once."""
    return not family_of(name).extra_passes and not registry.needs_latent(name)


class CrossFit:
    """One cross-fitted run: its folds, its latents, and the units that score every item, each
    recorded as it finishes and read back on resume (what a unit computes: :class:`UnitWork`)."""

    def __init__(self, cfg: CrossvalConfig, out: str | Path, device: str = "auto", progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        spec = read_training_config(cfg.config)
        data = cfg.data or spec.data.get("data", "builtin")
        yaml_words = spec.data.get("answer_words", cfg.eval.answer_words)
        if yaml_words != cfg.eval.answer_words:
            raise ConfigError(
                f"{cfg.config} trains on answers of {yaml_words} words (data.answer_words) but the run scores answers of "
                f"{cfg.eval.answer_words}: give --answer_words {yaml_words}, or a config that trains on {cfg.eval.answer_words}"
            )
        self.plan = FoldPlan.load(
            data, cfg.folds, cfg.fold_seed, cfg.eval.max_items, cfg.extra_train, cfg.eval.answer_words
        )
        if self.plan.n_short:
            log.info(f"left out {self.plan.n_short} idioms too short for answers of {cfg.eval.answer_words} words")
        template = cfg.template or spec.data.get("template") or cfg.eval.template
        self.eval = EvalConfig(**{**asdict(cfg.eval), "template": template, "estimators": chosen(cfg.eval.estimators)})
        self.latents = FoldLatents(cfg, spec, template, self.out, device)
        self.backbone = self.latents.backbone
        self.work = UnitWork(cfg, self.plan, self.eval, self.latents, progress)

    def manifest(self) -> dict:
        """What makes two runs' units interchangeable: the settings, the device, the training
        YAML's content, the backbone's weights, the idioms and their folds."""
        return {
            **asdict(self.cfg),
            "device": self.latents.device,
            "training config content": config_digest(self.cfg.config),
            "backbone weights": self.backbone.fingerprint(),
            "idioms and folds": self.plan.digest(),
        }

    def run(self, markdown: str | Path | None = None) -> dict:
        """Cross-fit and score unit by unit, then write results.json, scores.jsonl, report.md and the plots."""
        cfg, plan = self.cfg, self.plan
        # more seeds extend a run
        stamp = {"threads": torch.get_num_threads(), "torch": torch.__version__}
        units = Units(self.out / "units", self.manifest(), free=("seeds",), stamp=stamp)
        names, dropped = list(self.eval.estimators), {}
        for name in registry.fitted(names) if cfg.folds == 1 else ():
            names.remove(name)
            dropped[name] = "with one fold no scored item has out-of-fold latent features to fit it on"
        for name in [nm for nm in names if _held_out_posterior(nm)] if not cfg.refit_spread else ():
            names.remove(name)
            dropped[name] = f"needs {family_of(name).posterior.what}"
        targets = [t for nm in registry.fitted(names) for t in family_of(nm).fitted.targets]  # every item is fitted on
        runnable = Runner(self.backbone, None, self.eval, self.progress).runnable(list(dict.fromkeys(names + targets)))
        extra = f", +{len(plan.extra)} extra training idioms" if plan.extra else ""
        log.info(f"cross-fitting {len(plan.items)} idioms of {plan.data} in {cfg.folds} fold(s) x {len(cfg.seeds)} seed(s){extra}")
        if units.finished():
            log.info(f"resuming: {len(units.finished())} unit(s) recorded in {units.folder}")
        base = units.record("base", lambda: self.work.base(runnable))
        completions = [Completion(**{**c, "word_ids": tuple(c["word_ids"])}) for c in base["completions"]]
        labels = Labels(base["prompts"], completions, base["correct"])
        fixed = _unpack(base["scores"])  # the seed-free scores and the per-item fields
        by_seed, seconds, fold_log = {}, dict(base["seconds"]), []
        for seed in cfg.seeds:
            scores, seed_seconds, log_entries = self._seed(units, seed, names, runnable, labels, fixed)
            by_seed[seed] = scores
            fold_log += log_entries
            if seed == cfg.seeds[0]:
                seconds.update(seed_seconds)
        names = [nm for nm in names if nm in by_seed[cfg.seeds[0]]]
        prior = self.latents.spec.model.get("prior", "conditional")
        for nm in self.eval.estimators:
            if nm not in names and nm not in dropped:
                why = registry.why_not(nm, prior, self.eval.aggregate, self.cfg.ensemble) if registry.needs_latent(nm) else None
                dropped[nm] = why or "not computed on this model"
        fields = {key: fixed[key] for key in (*registry.fields(), *registry.tokens()) if key in fixed}
        results, rows = assemble(self, names, by_seed, labels, fields, seconds)
        results.update(dropped=dropped, fold_training=fold_log, seconds_total=units.seconds, computed_with=units.stamps)
        write(self.out, results, rows, markdown)
        return results

    def _seed(self, units: Units, seed: int, names: list[str], runnable: list[str], labels: Labels, fixed: dict):
        """Every item's scores under one training seed (its units, read back or computed), the
        seconds they took (the shared forward left out: the base unit's), and a log entry per fold."""
        stochastic = [nm for nm in runnable if not _seed_free(nm) and nm not in registry.features()]
        latent_names = [nm for nm in registry.computed(names) if registry.needs_latent(nm)]  # a fitted one's features too
        sto = units.record(f"seed{seed}", lambda: self.work.stochastic(seed, stochastic, labels))
        scores, seconds, fold_log = {**fixed, **_unpack(sto["scores"])}, dict(sto["seconds"]), []
        for fold in range(self.cfg.folds) if latent_names else ():
            name, train = f"seed{seed}-fold{fold}", self.work.training_items(fold, labels)
            unit = units.record(name, lambda f=fold, t=train: self.work.fold(seed, f, t, latent_names, labels))
            for key, values in unit["scores"].items():
                column = scores.setdefault(key, torch.full((len(labels.prompts),), float("nan")))
                column[unit["indices"]] = torch.tensor(values)
            for key, value in unit["seconds"].items():
                seconds[key] = seconds.get(key, 0.0) + value
            fold_log.append(unit["log"])
        for nm in registry.fitted(names):
            family = family_of(nm)
            fitted = units.record(f"seed{seed}-{family.name}", lambda f=family: self.work.fit(f, scores, labels))
            scores[nm] = torch.tensor(fitted["scores"])
            seconds[f"{family.name}_fit"] = fitted["seconds"]
        seconds.pop("shared", None)
        return scores, seconds, fold_log


class UnitWork:
    """What each unit of a cross-fitted run computes, as the JSON content it records: ``base`` (the
    completions, labels and seed-free scores), ``seed{s}`` (that seed's stochastic scores),
    ``seed{s}-fold{f}`` (fold f's latent and its scores of fold f) and ``seed{s}-{family}`` (a
    fitted family's cross-fitted scores)."""

    def __init__(self, cfg: CrossvalConfig, plan: FoldPlan, eval: EvalConfig, latents: FoldLatents, progress: bool) -> None:
        self.cfg, self.plan, self.eval, self.latents, self.progress = cfg, plan, eval, latents, progress
        self.backbone = latents.backbone
        self._features: dict[str, torch.Tensor] = {}

    def features(self, family: Family, labels: Labels) -> dict[str, torch.Tensor]:
        """The seed-free features a fitted family reads (``Family.features``: residual states), of
        every item, computed once by this process when a fit needs them and never recorded."""
        wanted = [key for key in family.fitted.features if key in registry.features() and key not in self._features]
        if wanted:
            runner = Runner(self.backbone, None, self.eval, self.progress)
            self._features.update(runner.scores(labels.prompts, labels.completions, wanted))
        return {key: self._features[key] for key in family.fitted.features if key in self._features}

    def base(self, runnable: list[str]) -> dict:
        """The unit ``base``: prompts, the base model's completions and labels, the seed-free scores
        (and the per-item fields: the lens by layer)."""
        base = Runner(self.backbone, None, self.eval, self.progress)
        prompts, completions, correct = base.label(self.plan.items, self.eval.template)
        seconds = {"forward": base.plain_forward_seconds(prompts, completions)}
        # every row carries the fields; the features are computed where a fit reads them, never recorded
        fixed_names = registry.with_fields([nm for nm in runnable if _seed_free(nm) and nm not in registry.features()])
        gold = [it.target for it in self.plan.items]
        fixed = base.scores(prompts, completions, fixed_names, gold=gold, seconds=seconds)
        completions = [asdict(c) for c in completions]
        return {"prompts": prompts, "completions": completions, "correct": correct, "scores": _pack(fixed),
                "seconds": seconds}

    def stochastic(self, seed: int, names: list[str], labels: Labels) -> dict:
        """The unit ``seed{s}``: the scores that need passes of their own but no latent, drawn with ``seed``."""
        runner = Runner(self.backbone, None, replace(self.eval, seed=seed), self.progress)
        seconds: dict[str, float] = {}
        scores = runner.scores(labels.prompts, labels.completions, names, seconds=seconds) if names else {}
        return {"scores": _pack(scores), "seconds": seconds}

    def training_items(self, fold: int, labels: Labels) -> list[IdiomItem]:
        """What fold f's latent trains on: the items outside f, the extra idioms (all of it with one
        fold) and, with ``self_targets``, the base model's own wrong answers to the prompts outside f."""
        plan, outside = self.plan, self.plan.outside(fold)
        held = set(self._held_out(fold))
        train = [plan.items[i] for i in outside if i not in held] + plan.extra
        if self.cfg.self_targets:
            own = [(plan.items[i].prefix, labels.completions[i].word) for i in outside if not labels.correct[i]]
            train += [IdiomItem(f"{prefix} {word}", prefix, word) for prefix, word in own if word]
        return train

    def _held_out(self, fold: int) -> list[int]:
        """With ``refit_spread``: the third of fold f's training idioms its latent leaves out for the
        spread's refit (dealt as folds are, by a hash seeded with the fold seed and f); else none."""
        if not self.cfg.refit_spread:
            return []
        outside = self.plan.outside(fold)
        inner = assign_folds([self.plan.items[i] for i in outside], refit.HELD_OUT, seed=1_000_003 * (fold + 1) + self.cfg.fold_seed)
        return [i for i, part in zip(outside, inner, strict=True) if part == 0]

    def _posterior_data(self, fold: int, train: list[IdiomItem], held_out: bool) -> PosteriorData:
        """What a posterior of fold f's latent is fitted on: its training prompts, and with
        ``held_out`` the idioms its training left out (:meth:`_held_out`)."""
        template = self.eval.template
        held = [self.plan.items[i] for i in self._held_out(fold)] if held_out else []
        return PosteriorData(
            [render_prompt(template, it.prefix) for it in train],
            [render_prompt(template, it.prefix) for it in held],
            [it.target for it in held],
        )

    def fold(self, seed: int, fold: int, train: list[IdiomItem], names: list[str], labels: Labels) -> dict:
        """The unit ``seed{s}-fold{f}``: the latent trained without fold f, and its scores of fold f."""
        plan = self.plan
        start = time.perf_counter()
        module, stats = self.latents.latent(seed, fold, train)
        members = [module]
        if self.cfg.ensemble > 1 and any("ensemble" in family_of(nm).needs for nm in names):
            members += [self.latents.latent(seed, fold, train, m)[0] for m in range(1, self.cfg.ensemble)]
        trained = time.perf_counter() - start
        idx, seconds = plan.inside(fold), {}
        setting = registry.setting(module, self.eval.aggregate, len(members))
        posteriors, described = {}, {}
        for posterior in registry.posteriors_for(names, setting):
            t0 = time.perf_counter()
            fitted = posterior.fit(module, self._posterior_data(fold, train, posterior.held_out))
            posteriors[posterior.name], took = fitted, time.perf_counter() - t0
            seconds.update({f"{family.name}_fit": took for family in registry.users_of(posterior)})  # each reader is charged it
            described.update(posterior.describe(fitted) if posterior.describe else {})
        runner = Runner(self.backbone, module, replace(self.eval, seed=seed), False, members=members, posteriors=posteriors)
        prompts, completions = [labels.prompts[i] for i in idx], [labels.completions[i] for i in idx]
        scores = runner.scores(prompts, completions, names, seconds=seconds, indices=idx)
        entry = {"seed": seed, "fold": fold, "n_train": len(train), "n_scored": len(idx), "train_seconds": trained,
                 "latents": len(members)}
        entry.update({k: stats[k] for k in ("kl", "nll", "active_units") if k in stats})
        entry.update(described)
        if self.cfg.from_checkpoints:
            how = f"loaded the latent trained on its {len(train)} idioms"
        else:
            what = f"{len(members)} latents" if len(members) > 1 else "trained"
            how = (f"{what} on {len(train)} idioms in {trained:.0f} s (KL {stats.get('kl', math.nan):.2f} nats/item, "
                   f"{stats.get('active_units', math.nan):.0f} active units)")
        log.info(f"  seed {seed} fold {fold + 1}/{self.cfg.folds}: {how}, scored {len(idx)}")
        return {"indices": idx, "scores": _pack(scores), "seconds": seconds, "log": entry}

    def fit(self, family: Family, scores: dict[str, torch.Tensor], labels: Labels) -> dict:
        """The unit ``seed{s}-{family}``: a fitted family's cross-fitted scores and the seconds its fits took."""
        scores = {**scores, **self.features(family, labels)}
        start = time.perf_counter()
        fitted = cross_fitted(family, scores, labels.correct, self.plan.folds, self.cfg.folds)
        return {"scores": fitted.tolist(), "seconds": time.perf_counter() - start}


def _pack(scores: dict[str, torch.Tensor]) -> dict[str, list]:
    """Scores as plain lists for a unit's JSON (float32 values read back exactly)."""
    return {key: value.tolist() for key, value in scores.items()}


def _unpack(scores: dict[str, list]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value, dtype=torch.float32) for key, value in scores.items()}


def crossval(
    cfg: CrossvalConfig,
    out_dir: str | Path,
    markdown: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Run the cross-fitted comparison, resuming from ``out_dir/units``, and write its files; returns
    results.json's content.

    Args:
        device: ``auto``: where the training YAML's trainer trains; else ``cpu``, ``cuda``, ``cuda:N``.
    """
    try:
        return CrossFit(cfg, out_dir, device, progress).run(markdown)
    except KeyError as err:  # an estimator name the registry does not know
        raise UserError(f"unknown estimator {err}: choose from {', '.join(NAMES)}") from None
