"""Cross-fitted comparison: every idiom gets a score from a latent that never trained on it.

The items are cut into K folds by a seeded hash of the normalised idiom (balanced, and
independent of file order). For each training seed and each fold f, a latent is trained on the
idioms outside f (plus any ``extra_train`` idioms, with the scored idioms and their variants taken out) and scores
the idioms of f. Every item thus has an out-of-fold latent score, and the metrics, bootstrap
intervals and paired tests run over all n items instead of one small test split.

What does not depend on the latent runs once: the base model's completions and labels (greedy,
so seed-free) and the deterministic single-pass families. The stochastic families (MC dropout,
sampled completions, the z draws) are repeated per seed, so the spread across seeds covers
training and sampling noise; folds stay fixed across seeds.

The probe is cross-fitted too: for fold f it is fitted on the items outside f, each with the
latent features of its *own* fold's latent (out-of-sample for that latent), and it scores the
items of f with the features of f's latent. Every feature row the probe sees, in fitting or in
scoring, is thus out-of-sample for the latent that produced it, so fitting and scoring see the
same feature distribution; no error label of fold f enters its probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

from vtrans import checkpoint, metrics, report
from vtrans.config import CrossvalConfig, EvalConfig
from vtrans.data import IdiomItem, _idiom_key, idiom_hash, load_idioms, parse_spec
from vtrans.datamodule import IdiomDataModule
from vtrans.errors import ConfigError, UserError
from vtrans.estimators import probe
from vtrans.estimators.registry import NAMES, NEEDS_LATENT, PROBE_FEATURES, family_of
from vtrans.evaluate import CHEAP_BASELINES, costs
from vtrans.frozen import FrozenCache
from vtrans.runner import Runner


def _seed_free(name: str) -> bool:
    """Read off the shared forward alone, with no latent: the same for every seed, so run once."""
    family = family_of(name)
    return not family.extra_passes and name not in NEEDS_LATENT


@dataclass
class TrainingSpec:
    """What a training YAML says about the backbone, the latent, the data and the trainer."""

    backbone: dict
    model: dict
    data: dict
    max_epochs: int
    trainer: dict


def read_training_config(path: str | Path) -> TrainingSpec:
    """The parts of a ``train.py`` YAML that cross-fitting needs.

    Raises:
        ConfigError: a missing or unreadable file, or one that names no ``vtrans.loading.Backbone``.
    """
    from vtrans.module import LatentLM

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    model = dict(raw.get("model") or {})
    backbone = model.pop("backbone", None)
    if not isinstance(backbone, dict) or not str(backbone.get("class_path", "")).endswith("Backbone"):
        raise ConfigError(f"{path}: model.backbone must be a vtrans.loading.Backbone with init_args")
    allowed = set(inspect.signature(LatentLM.__init__).parameters) - {"self", "backbone"}
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown latent setting(s) {', '.join(unknown)}: choose from {', '.join(sorted(allowed))}")
    trainer = dict(raw.get("trainer") or {})
    return TrainingSpec(
        backbone=dict(backbone.get("init_args") or {}),
        model=model,
        data=dict(raw.get("data") or {}),
        max_epochs=int(trainer.get("max_epochs") or 8),
        trainer=trainer,
    )


def assign_folds(items: list[IdiomItem], folds: int, seed: int = 0) -> list[int]:
    """Fold of each item: items sorted by a seeded hash of the normalised idiom, dealt round-robin.

    The folds differ in size by at most one, and an idiom's fold depends on the seed and the set
    of idioms only, not on file order.
    """

    def key(item: IdiomItem) -> bytes:
        return hashlib.blake2b(f"fold\0{seed}\0{_idiom_key(item.idiom)}".encode(), digest_size=8).digest()

    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    assigned = [0] * len(items)
    for rank, i in enumerate(order):
        assigned[i] = rank % folds
    return assigned


def _variant_key(item: IdiomItem) -> tuple[str, str]:
    """An idiom's first and last word, normalised: what two spellings of one idiom share."""
    return _idiom_key(item.prefix).split(" ")[0], _idiom_key(item.target)


def extra_training_items(extra: list[IdiomItem], scored: list[IdiomItem]) -> list[IdiomItem]:
    """The extra training idioms that are no scored idiom, nor a variant of one.

    An extra idiom is dropped when its normalised form equals a scored one's, or when it shares
    a scored idiom's first and last word ("beat around the bush" and "beat about the bush",
    "blow one's stack" and "blow your stack"), so that no scored idiom is trained on in
    another spelling.
    """
    keys = {_idiom_key(it.idiom) for it in scored}
    variants = {_variant_key(it) for it in scored}
    return [it for it in extra if _idiom_key(it.idiom) not in keys and _variant_key(it) not in variants]


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


class CrossFit:
    """One cross-fitted run: the backbone, the items, their folds, and every score by seed."""

    def __init__(self, cfg: CrossvalConfig, device: str = "cpu", progress: bool = True) -> None:
        from vtrans.loading import Backbone

        self.cfg, self.device, self.progress = cfg, device, progress
        self.spec = read_training_config(cfg.config)
        data_spec = cfg.data or self.spec.data.get("data", "builtin")
        kind, split = parse_spec(data_spec)
        items = load_idioms(data_spec)
        if kind == "builtin" and split not in (None, "all"):
            raise ConfigError(f"cross-fitting uses every idiom of a set: write {kind}, not {data_spec}")
        if cfg.eval.max_items:
            items = items[: cfg.eval.max_items]
        if len(items) < 2 * cfg.folds:
            raise ConfigError(f"{data_spec} has {len(items)} idioms: too few for {cfg.folds} folds")
        self.data_spec, self.items = data_spec, items
        self.folds = assign_folds(items, cfg.folds, cfg.fold_seed) if cfg.folds > 1 else [0] * len(items)
        self.extra: list[IdiomItem] = []
        self.n_extra_dropped = 0
        if cfg.extra_train:
            offered = load_idioms(cfg.extra_train)
            self.extra = extra_training_items(offered, items)
            self.n_extra_dropped = len(offered) - len(self.extra)
        template = cfg.template or self.spec.data.get("template") or cfg.eval.template
        self.eval = EvalConfig(**{**asdict(cfg.eval), "template": template})
        self.backbone = Backbone(**self.spec.backbone).to(device)
        self.frozen = FrozenCache()  # the frozen backbone's per-item states, shared by every fold and seed

    # ------------------------------------------------------------------ training

    def train_fold(self, seed: int, fold: int):
        """A latent trained on the idioms outside ``fold`` (plus the extra ones), in eval mode."""
        from vtrans.module import LatentLM

        outside = [i for i, f in enumerate(self.folds) if f != fold]
        train = [self.items[i] for i in outside] + self.extra  # one fold: nothing outside it, the extra idioms alone
        if self.cfg.self_targets:
            train += [self._own[i] for i in outside if self._own[i] is not None]
        if self.cfg.from_checkpoints:
            return self._load_fold(seed, fold, train), len(train), {}
        data = self.spec.data
        datamodule = IdiomDataModule.from_items(
            train,
            template=self.eval.template,
            batch_size=int(data.get("batch_size", 32)),
            seed=seed,
            length_bucketed=bool(data.get("length_bucketed", False)),
        )
        L.seed_everything(seed, workers=True, verbose=False)
        module = LatentLM(self.backbone, **self.spec.model)
        if module.hparams.cache_frozen:
            module.frozen_cache = self.frozen
        accelerator = "gpu" if str(self.device).startswith("cuda") else "cpu"
        with _quiet_lightning():
            trainer = L.Trainer(
                max_epochs=self.cfg.epochs or self.spec.max_epochs,
                accelerator=accelerator,
                devices=1,
                precision=self.spec.trainer.get("precision", "32-true"),
                gradient_clip_val=self.spec.trainer.get("gradient_clip_val"),
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
            )
            trainer.fit(module, datamodule=datamodule)
        stats = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if self.cfg.save_checkpoints:
            self._ckpt_dir.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self._ckpt_dir / f"seed{seed}-fold{fold}.ckpt", weights_only=True)
        return module.eval(), len(train), stats

    def _load_fold(self, seed: int, fold: int, train: list[IdiomItem]):
        """The latent of (seed, fold) from ``from_checkpoints``, refused unless it trained on ``train`` exactly."""
        path = Path(self.cfg.from_checkpoints) / f"seed{seed}-fold{fold}.ckpt"
        if not path.is_file():
            raise ConfigError(f"{path} not found: --from_checkpoints needs seed{seed}-fold{fold}.ckpt (written by --save_checkpoints)")
        recorded = checkpoint.trained_idiom_hashes(path)
        wanted = {idiom_hash(it.idiom) for it in train}
        if recorded != wanted:
            have = "no record of its idioms" if recorded is None else f"{len(recorded)} recorded idioms, {len(recorded ^ wanted)} differ"
            raise ConfigError(
                f"{path} was not trained on this fold's {len(wanted)} training idioms ({have}): "
                "use the same --data, --folds, --fold_seed, --extra_train and --self_targets as the run that wrote it"
            )
        return checkpoint.load(path, self.device, backbone=self.backbone)  # to score with: no training, no frozen cache

    # ------------------------------------------------------------------ the run

    def run(self, out_dir: str | Path, markdown: str | Path | None = None) -> dict:
        """Cross-fit, score, and write results.json, scores.jsonl, report.md and the plots."""
        cfg, ev = self.cfg, self.eval
        out = Path(out_dir)
        self._ckpt_dir = out / "checkpoints"
        start_all = time.perf_counter()
        names = list(ev.estimators)
        dropped: dict[str, str] = {}
        if cfg.folds == 1 and "probe" in names:
            names.remove("probe")
            dropped["probe"] = "with one fold no scored item has out-of-fold latent features to fit it on"
        base = Runner(self.backbone, None, ev, self.progress)
        runnable = base.runnable(names)  # the latent's names are left out: no module here
        wants_latent = any(n in NEEDS_LATENT for n in names) or "probe" in names
        n = len(self.items)
        _say(
            f"cross-fitting {n} idioms of {self.data_spec} in {cfg.folds} fold(s) x {len(cfg.seeds)} seed(s)"
            + (f", +{len(self.extra)} extra training idioms" if self.extra else ""),
            not self.progress,
        )
        prompts, completions, correct = base.label(self.items, ev.template)
        self._own = [
            None if ok or not c.word else IdiomItem(f"{it.prefix} {c.word}", it.prefix, c.word)
            for it, c, ok in zip(self.items, completions, correct, strict=True)
        ]
        seconds = {"forward": base.plain_forward_seconds(prompts, completions)}
        fixed_names = [nm for nm in runnable if _seed_free(nm)]
        if "lens_ce" not in fixed_names:
            fixed_names.append("lens_ce")  # every row carries its lens trajectory
        gold = [it.target for it in self.items]
        fixed = base.scores(prompts, completions, fixed_names, gold=gold, seconds=seconds)
        lens_by_layer = fixed.pop("lens_ce_by_layer")
        lens_gold = fixed.pop("lens_ce_gold_by_layer", None)
        by_seed: dict[int, dict[str, torch.Tensor]] = {}
        fold_log = []
        stochastic = [nm for nm in runnable if not _seed_free(nm)]
        for seed in cfg.seeds:
            runner = Runner(self.backbone, None, replace(ev, seed=seed), self.progress)
            sto_seconds: dict[str, float] = {}
            scores = runner.scores(prompts, completions, stochastic, seconds=sto_seconds) if stochastic else {}
            scores = {**fixed, **scores}
            if seed == cfg.seeds[0]:
                seconds.update({k: v for k, v in sto_seconds.items() if k != "shared"})
            if wants_latent:
                latent_scores, latent_seconds, log = self._latent_scores(seed, names, prompts, completions)
                scores.update(latent_scores)
                fold_log += log
                if seed == cfg.seeds[0]:
                    seconds.update({k: v for k, v in latent_seconds.items() if k != "shared"})
            if "probe" in names:
                t0 = time.perf_counter()
                scores["probe"] = self._probe(scores, lens_by_layer, correct)
                if seed == cfg.seeds[0]:
                    seconds["probe_fit"] = time.perf_counter() - t0
            by_seed[seed] = scores
        names = [nm for nm in names if nm in by_seed[cfg.seeds[0]]]
        for nm in ev.estimators:
            if nm not in names and nm not in dropped:
                dropped[nm] = "not computed on this model" if nm not in NEEDS_LATENT else "the latent's prior gives none"
        results, rows = self._results(names, by_seed, prompts, completions, correct, lens_by_layer, lens_gold, seconds)
        results["dropped"] = dropped
        results["fold_training"] = fold_log
        results["seconds_total"] = time.perf_counter() - start_all
        out.mkdir(parents=True, exist_ok=True)
        report.write_scores_jsonl(out / "scores.jsonl", rows)
        report.write_results_json(out / "results.json", results)
        plots = report.plot_all(out, rows, results)
        plots += report.plot_seed_forest(out, results)
        md = Path(markdown) if markdown else out / "report.md"
        report.write_crossval_md(md, results, [str(Path(_relpath(out / p, md.parent))) for p in plots])
        if md != out / "report.md":
            report.write_crossval_md(out / "report.md", results, plots)
        return results

    def _latent_scores(self, seed: int, names: list[str], prompts, completions):
        """Out-of-fold latent scores of every item for one seed, the seconds spent scoring, and a log per fold."""
        n, collected, seconds, log = len(self.items), {}, {}, []
        latent_names = [nm for nm in names if nm in NEEDS_LATENT]
        if "probe" in names:
            latent_names = sorted(set(latent_names) | (set(PROBE_FEATURES) & NEEDS_LATENT))
        for fold in range(self.cfg.folds):
            t0 = time.perf_counter()
            module, n_train, stats = self.train_fold(seed, fold)
            trained = time.perf_counter() - t0
            idx = [i for i, f in enumerate(self.folds) if f == fold]
            runner = Runner(self.backbone, module, replace(self.eval, seed=seed), progress=False)
            part = runner.scores(
                [prompts[i] for i in idx], [completions[i] for i in idx], latent_names, seconds=seconds, indices=idx
            )
            for key, value in part.items():
                collected.setdefault(key, torch.full((n,), float("nan")))[idx] = value
            entry = {"seed": seed, "fold": fold, "n_train": n_train, "n_scored": len(idx), "train_seconds": trained}
            entry.update({k: stats[k] for k in ("kl", "nll", "active_units") if k in stats})
            log.append(entry)
            if self.cfg.from_checkpoints:
                how = f"loaded the latent trained on its {n_train} idioms"
            else:
                how = (
                    f"trained on {n_train} idioms in {trained:.0f} s (KL {stats.get('kl', math.nan):.2f} nats/item, "
                    f"{stats.get('active_units', math.nan):.0f} active units)"
                )
            _say(f"  seed {seed} fold {fold + 1}/{self.cfg.folds}: {how}, scored {len(idx)}", not self.progress)
            del module
        return collected, seconds, log

    def _probe(self, scores: dict[str, torch.Tensor], lens_by_layer: torch.Tensor, correct: list[bool]) -> torch.Tensor:
        """Cross-fitted probe scores: fold f's probe is fitted on the other folds' items (their own out-of-fold features)."""
        x, names = probe.features(scores, lens_by_layer, PROBE_FEATURES)
        errors = torch.tensor([not c for c in correct], dtype=torch.float32)
        folds = torch.tensor(self.folds)
        result = torch.full((len(correct),), float("nan"))
        for fold in range(self.cfg.folds):
            inside = folds == fold
            try:
                fitted = probe.fit(x[~inside], errors[~inside], names)
            except ValueError:  # all of one class outside this fold: no probe for it
                continue
            result[inside] = fitted.predict(x[inside])
        return result

    # ------------------------------------------------------------------ results

    def _results(self, names, by_seed, prompts, completions, correct, lens_by_layer, lens_gold, seconds):
        cfg = self.cfg
        errors = np.array([0.0 if c else 1.0 for c in correct])
        first = cfg.seeds[0]
        cost = costs(seconds, names)
        per_seed = {
            seed: {nm: by_seed[seed][nm].double().numpy() for nm in names if nm in by_seed[seed]} for seed in cfg.seeds
        }
        aurocs = {nm: [metrics.auroc(*metrics.scored(per_seed[s][nm], errors)) for s in cfg.seeds] for nm in names}
        cheap = [nm for nm in CHEAP_BASELINES if nm in names]
        reference = max(cheap, key=lambda nm: np.nan_to_num(metrics.spread(aurocs[nm])["mean"], nan=-1.0)) if cheap else names[0]
        rows = []
        for i, item in enumerate(self.items):
            row = {
                "idiom": item.idiom,
                "prompt": prompts[i],
                "target": item.target,
                "completion": completions[i].text.strip(),
                "completion_word": completions[i].word,
                "correct": bool(correct[i]),
                "fold": self.folds[i],
                "scores": {nm: float(per_seed[first][nm][i]) for nm in names},
                "scores_by_seed": {str(s): {nm: float(per_seed[s][nm][i]) for nm in names} for s in cfg.seeds[1:]},
                "lens_ce_by_layer": lens_by_layer[i].tolist(),
            }
            if lens_gold is not None:
                row["lens_ce_gold_by_layer"] = lens_gold[i].tolist()
            rows.append(row)
        results = report.build_results(
            self.backbone.name,
            rows,
            cost,
            n_boot=self.eval.n_boot,
            seed=0,
            reference=reference,
            extra={
                "protocol": {
                    "kind": "cross-fitted",
                    "folds": cfg.folds,
                    "seeds": cfg.seeds,
                    "fold_seed": cfg.fold_seed,
                    "training_config": cfg.config,
                    "data": self.data_spec,
                    "extra_train": cfg.extra_train,
                    "n_extra_train": len(self.extra),
                    "n_extra_dropped": self.n_extra_dropped,
                    "from_checkpoints": cfg.from_checkpoints,
                    "self_targets": cfg.self_targets,
                    "epochs": cfg.epochs or self.spec.max_epochs,
                    "latent": self.spec.model,
                    "backbone": self.spec.backbone,
                },
                "config": asdict(self.eval),
                "seconds": seconds,
            },
        )
        for nm in names:
            values = np.array(aurocs[nm], dtype=float)
            results["estimators"][nm]["seeds"] = {"auroc": values.tolist(), **metrics.spread(values)}
            if nm != reference and nm in results["paired_vs_reference"]:
                deltas = values - np.array(aurocs[reference])
                results["paired_vs_reference"][nm]["seeds"] = {"delta": deltas.tolist(), **metrics.spread(deltas)}
        return results, rows


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's per-Trainer info lines (accelerators, tips, "max_epochs reached"), once per fold, hidden."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen backbone
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        logger.setLevel(level)


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start)


def crossval(cfg: CrossvalConfig, out_dir: str | Path, markdown: str | Path | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Run the cross-fitted comparison and write its files; returns results.json's content."""
    try:
        return CrossFit(cfg, device, progress).run(out_dir, markdown)
    except KeyError as err:  # an estimator name the registry does not know
        raise UserError(f"unknown estimator {err}: choose from {', '.join(NAMES)}") from None

