"""The comparative run: one set of completions, one set of labels, every estimator, the same metrics.

1. The base model (latent off) completes every prompt; an item is wrong (error = 1) when the
   completion word differs from the idiom's last word.
2. Each estimator family scores the same items, timed on its own; a plain forward on the same
   batches is the unit of cost.
3. Metrics with bootstrap intervals, a paired comparison against ``lens_ce``, the files of the
   contract (results.json, scores.jsonl, report.md) and the plots.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from vtrans import report
from vtrans.config import EstimatorConfig, check_all
from vtrans.data import (
    DEFAULT_TEMPLATE,
    DataError,
    IdiomItem,
    _idiom_key,
    idiom_hash,
    load_split,
    render_prompt,
    validate_template,
)
from vtrans.errors import ConfigError
from vtrans.estimators import attention, baselines, lens, mc_dropout, probe, sampling
from vtrans.estimators import latent as latent_estimators
from vtrans.estimators.registry import (
    FAMILIES,
    FIRST_TOKEN_ONLY,
    LATENT_FAMILIES,
    NAMES,
    NEEDS_LATENT,
    family_of,
)
from vtrans.generate import Completion, complete, is_correct
from vtrans.tokens import encode, slot_positions, target_ids

SINGLE_PASS_FAMILIES = ("baselines", "attention", "lens")
# "ahead of the baselines" means ahead of the best of these (the paired reference of every report)
CHEAP_BASELINES = ("msp", "entropy", "sample_disagreement", "sample_word_entropy")
PROBE_FAMILIES = (*SINGLE_PASS_FAMILIES, "latent")  # the families of the probe's features (latent: encoders only)


class ProbeUnfittable(ValueError):
    """The probe has nothing to learn from: no training items, or all of one class."""


@dataclass
class EvalConfig(EstimatorConfig):
    """Settings of a comparative run: the estimators' (:class:`vtrans.config.EstimatorConfig`),
    plus the data and the report's.

    Attributes:
        data: data spec (``builtin``, ``builtin:test``, ``txt:PATH``, ...).
        split: split to evaluate when the spec names none (``train``, ``val``, ``test``, ``all``).
        template: prompt template with one ``{prefix}`` field.
        estimators: names to run (default: all that apply).
        n_boot: bootstrap resamples.
        max_items: evaluate at most this many items (None = all).
        keep_seen: keep items whose idiom the checkpoint's latent was trained on (default: leave them out).
        split_seed: seed of the idiom split; None: the checkpoint's (else 0). One that differs from
            the checkpoint's is refused: its train split would leak into the evaluated one.
        val_fraction: fraction of idioms in the validation split; None: the checkpoint's (else 0.15).
        test_fraction: fraction of idioms in the test split; None: the checkpoint's (else 0.15).
    """

    data: str = "builtin"
    split: Literal["train", "val", "test", "all"] = "test"
    template: str = DEFAULT_TEMPLATE
    estimators: list[str] = field(default_factory=lambda: list(NAMES))
    n_boot: int = 1000
    max_items: int | None = None
    keep_seen: bool = False
    split_seed: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [n for n in self.estimators if n not in NAMES]
        if unknown:
            raise ConfigError(f"unknown estimator(s) {', '.join(unknown)}: choose from {', '.join(NAMES)}")
        validate_template(self.template)
        check_all(
            [
                (self.n_boot >= 100, f"n_boot must be >= 100, got {self.n_boot}"),
                (self.max_items is None or self.max_items >= 1, f"max_items must be >= 1, got {self.max_items}"),
            ]
        )


@dataclass
class Scored:
    """Completions, labels and every estimator's scores for a list of items."""

    items: list[IdiomItem]
    prompts: list[str]
    completions: list[Completion]
    correct: list[bool]
    scores: dict[str, torch.Tensor]
    lens_by_layer: torch.Tensor | None
    lens_gold_by_layer: torch.Tensor | None
    seconds: dict[str, float]


class Harness:
    """Runs completions and estimator families on a backbone, with or without a trained latent."""

    def __init__(self, backbone, module=None, config: EvalConfig | None = None, progress: bool = True) -> None:
        self.backbone, self.module = backbone, module
        self.config = config or EvalConfig()
        self.model, self.tokenizer = backbone.model, backbone.tokenizer
        self.device = next(self.model.parameters()).device
        self.progress = progress

    def families(self, names: list[str]) -> list[str]:
        """The estimator families that ``names`` need, in registry order (the probe needs its features')."""
        wanted = {family_of(n) for n in names}
        if "probe" in wanted:
            wanted |= set(PROBE_FAMILIES)
        if self.module is None:
            wanted -= set(LATENT_FAMILIES)
        return [f for f in FAMILIES if f in wanted and f != "probe"]

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="item", disable=not self.progress, leave=False)

    def complete(self, prompts: list[str]) -> list[Completion]:
        cfg = self.config
        with self._bar(len(prompts), "completions") as bar:
            return complete(
                self.model,
                self.tokenizer,
                prompts,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.sample,
                temperature=cfg.temperature,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                progress=bar.update,
            )

    def _encoded_batches(self, prompts: list[str], completions: list[Completion], whole_word: bool = False):
        """Batches of prompts followed by their completions: the whole word when ``whole_word`` or
        ``aggregate`` needs it, else ŷ alone. The latent family always takes the whole word: its
        ``latent_kl`` reads q(z|prompt, target) at the last target token, as in training."""
        cfg = self.config
        whole_word = whole_word or cfg.aggregate != "first"
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = completions[start : start + cfg.batch_size]
            tgt = [list(c.word_ids) if whole_word else [c.first_token] for c in chunk]
            yield start, encode(self.tokenizer, prompts[start : start + cfg.batch_size], tgt, self.device)

    def _family_fn(
        self,
        family: str,
        gold: list[int] | None,
        names: list[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Callable:
        """``fn(enc, items_slice) -> {name: tensor}`` for one family; ``names`` (default: all) may spare
        work no asked-for estimator needs (the z samples of ``latent_mi``); ``generator`` is the run's
        source of z noise (one per run, so that successive batches draw fresh noise)."""
        cfg = self.config
        if family == "baselines":
            return lambda enc, sl: baselines.scores(self.model, enc, cfg.aggregate)
        if family == "attention":
            return lambda enc, sl: attention.scores(self.model, enc)
        if family == "lens":
            return lambda enc, sl: lens.scores(
                self.model, enc, cfg.aggregate, None if gold is None else torch.tensor(gold[sl], device=self.device)
            )
        if family == "mc_dropout":
            return lambda enc, sl: mc_dropout.scores(
                self.model, enc, cfg.passes, cfg.dropout, from_layer=cfg.mc_from_layer
            )
        if family == "latent":  # the encoders only
            return lambda enc, sl: latent_estimators.scores(self.module, enc, mi=False)
        if family == "latent_mi":
            return lambda enc, sl: {
                name: value
                for name, value in latent_estimators.scores(
                    self.module, enc, cfg.samples, cfg.seed, mi=True, generator=generator, draws=cfg.z_draws
                ).items()
                if name in FAMILIES["latent_mi"]
            }
        raise KeyError(family)

    def _family_parts(
        self,
        family: str,
        prompts: list[str],
        completions: list[Completion],
        gold,
        names,
        progress=None,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """A family's scores, part by part: per encoded batch, or all at once for ``sampling``, which
        reads the prompts and the greedy completions instead."""
        cfg = self.config
        if family == "sampling":
            yield sampling.scores(
                self.model,
                self.tokenizer,
                prompts,
                completions,
                k=cfg.agreement_samples,
                temperature=cfg.agreement_temperature,
                seed=sampling.sample_seed(cfg.seed),
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                progress=progress,
            )
            return
        fn = self._family_fn(family, gold, names, generator)
        for first, enc in self._encoded_batches(prompts, completions, family in LATENT_FAMILIES):
            yield fn(enc, slice(first, first + enc.input_ids.shape[0]))
            if progress is not None:
                progress(enc.input_ids.shape[0])

    @torch.no_grad()
    def plain_forward_seconds(self, prompts: list[str], completions: list[Completion]) -> float:
        """The unit of cost: a plain Hugging Face forward over the same batches."""
        start = time.perf_counter()
        for _, enc in self._encoded_batches(prompts, completions):
            self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids)
        _sync(self.device)
        return time.perf_counter() - start

    def label(self, items: list[IdiomItem]) -> tuple[list[str], list[Completion], list[bool]]:
        """Prompts, the base model's completions and whether each is correct."""
        prompts = [render_prompt(self.config.template, it.prefix) for it in items]
        completions = self.complete(prompts)
        correct = [is_correct(c, it.target) for c, it in zip(completions, items, strict=True)]
        return prompts, completions, correct

    def score(self, items: list[IdiomItem], names: list[str], gold: bool = True) -> Scored:
        """Completions, labels and the scores of every family ``names`` need, each family timed on its own."""
        prompts, completions, correct = self.label(items)
        seconds = {"forward": self.plain_forward_seconds(prompts, completions)}
        tensors, family_seconds = self.run_families(
            items, prompts, completions, self.families(names), names, gold=gold
        )
        seconds.update(family_seconds)
        lens_by_layer = tensors.pop("lens_ce_by_layer", None)
        lens_gold = tensors.pop("lens_ce_gold_by_layer", None)
        return Scored(items, prompts, completions, correct, tensors, lens_by_layer, lens_gold, seconds)

    def run_families(
        self,
        items: list[IdiomItem],
        prompts: list[str],
        completions: list[Completion],
        families: list[str],
        names: list[str] | None = None,
        gold: bool = True,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The scores of ``families`` on completions already made, and each family's seconds.

        The global random state is seeded with ``config.seed`` first, so a family's stochastic
        scores (dropout masks, z samples) depend on the seed, not on what ran before.

        Returns:
            ``{name: (n,) tensor}`` (plus ``lens_ce_by_layer`` and, with ``gold``,
            ``lens_ce_gold_by_layer``, (n, L+1)) on the CPU, and ``{family: seconds}``.
        """
        gold_ids = None
        if gold:
            gold_ids = [ids[0] if ids else 0 for ids in target_ids(self.tokenizer, [it.target for it in items])]
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        seconds: dict[str, float] = {}
        torch.manual_seed(self.config.seed)
        generator = self.generator()
        for family in families:
            start = time.perf_counter()
            with self._bar(len(prompts), family) as bar:
                for part in self._family_parts(family, prompts, completions, gold_ids, names, bar.update, generator):
                    for key, value in part.items():
                        collected[key].append(value.detach().float().cpu())
            _sync(self.device)
            seconds[family] = time.perf_counter() - start
        return {k: torch.cat(v) for k, v in collected.items()}, seconds

    @torch.no_grad()
    def probe_features(self, prompts: list[str], completions: list[Completion]) -> tuple[torch.Tensor, list[str]]:
        """The probe's (n, F) features and their names, at the least cost (nothing here is timed).

        One forward per batch gives logits, hidden states and attention weights, so the three
        single-pass families cost one forward instead of three; the latent runs its encoders only
        (no z samples: ``latent_mi`` is not a feature). With a latent every prompt is followed by its
        whole completion word (``latent_kl`` reads the last one); the other features read the scored
        position, which causal attention keeps as it was. Needs eager attention.
        """
        cfg = self.config
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        with self._bar(len(prompts), "probe features") as bar:
            for _, enc in self._encoded_batches(prompts, completions, self.module is not None):
                out = self.model(
                    **enc.inputs,
                    output_hidden_states=True,
                    output_attentions=True,
                    use_cache=False,
                    logits_to_keep=enc.targets.shape[1] + 1,
                )
                parts = {
                    **baselines.from_logits(slot_positions(out.logits, enc), enc, cfg.aggregate),
                    **attention.from_attentions(out.attentions, enc),
                    **lens.from_hidden_states(self.model, out.hidden_states, enc, cfg.aggregate),
                }
                if self.module is not None:
                    parts.update(latent_estimators.scores(self.module, enc, mi=False))
                for key, value in parts.items():
                    collected[key].append(value.float().cpu())
                bar.update(enc.input_ids.shape[0])
        tensors = {k: torch.cat(v) for k, v in collected.items()}
        return probe.features(tensors, tensors.pop("lens_ce_by_layer"))

    def generator(self) -> torch.Generator:
        """A new source of z noise seeded from ``config.seed``: one per run."""
        return torch.Generator(device=self.device).manual_seed(self.config.seed)

    def score_prompts(
        self, prompts: list[str], names: list[str], generator: torch.Generator | None = None
    ) -> tuple[list[Completion], dict[str, torch.Tensor]]:
        """Completions and scores for bare prompts (no idiom target, so no labels): ``vtrans score``.

        The same families as :meth:`score` run on the same encoded batches; the global random
        state is left as it was (dropout masks and z samples come from ``config.seed``). A caller
        that scores one run in several calls passes the run's ``generator`` (:meth:`generator`) so
        that the z noise goes on from call to call; ``None`` starts a new one.

        Returns:
            The completions and ``{name: (n,) tensor}`` (plus ``lens_ce_by_layer``, (n, L+1),
            when the lens runs), on the CPU.
        """
        completions = self.complete(prompts)
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            generator = generator or self.generator()
            for family in self.families(names):
                for part in self._family_parts(family, prompts, completions, None, names, None, generator):
                    for key, value in part.items():
                        collected[key].append(value.detach().float().cpu())
        return completions, {k: torch.cat(v) for k, v in collected.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def costs(seconds: dict[str, float], names: list[str], probe_families: list[str]) -> dict[str, dict[str, float]]:
    """What each estimator costs alone, in seconds and in plain forwards over the same items.

    An estimator is charged its family's seconds; the probe the families of its features plus
    its fit (``probe_fit``: its training items' completions, features and the regression).
    """
    forward = max(seconds["forward"], 1e-9)
    result = {}
    for name in names:
        families = [*probe_families, "probe_fit"] if name == "probe" else [family_of(name)]
        total = sum(seconds.get(f, float("nan")) for f in families)
        result[name] = {"seconds": total, "cost_forward_equiv": total / forward}
    return result


def fit_probe(harness: Harness, train_items: list[IdiomItem], evaluated: Scored) -> torch.Tensor:
    """Probe scores for the evaluated items, from a probe fitted on ``train_items`` only.

    The training items are completed and labelled first; their features are computed only when
    both classes are present.

    Raises:
        ProbeUnfittable: the base model's completions of the training items are all right or all wrong.
    """
    prompts, completions, correct = harness.label(train_items)
    n_right = sum(correct)
    if n_right in (0, len(correct)):
        raise ProbeUnfittable(
            f"the base model completes {n_right} of its {len(correct)} training items correctly: "
            "a probe needs both right and wrong ones"
        )
    x_train, feature_names = harness.probe_features(prompts, completions)
    errors = torch.tensor([not c for c in correct], dtype=torch.float32)
    fitted = probe.fit(x_train, errors, feature_names)
    x_eval, eval_names = probe.features(evaluated.scores, evaluated.lens_by_layer)
    if eval_names != feature_names:
        raise RuntimeError(f"probe features differ between splits: {feature_names} vs {eval_names}")
    return fitted.predict(x_eval)


def probe_train_items(
    evaluated: list[IdiomItem], trained_with: dict | None = None, trained: set[str] | None = None
) -> tuple[list[IdiomItem], str]:
    """The items the probe is fitted on, and where they come from.

    The rule: items (a) disjoint from the evaluated ones (normalised idioms) and (b) out-of-sample
    for every learned part that produces the probe's features, so that its features behave at
    fitting as they do on the evaluated items.

    * With a checkpoint (``trained_with``: its ``datamodule_hyper_parameters``): the validation
      split of the data the latent was trained on, split with the seed and fractions it was
      trained with (idioms held out from its training), less any idiom of that training split
      (a ``builtin:SPLIT`` spec serves one split to every stage) and less any evaluated idiom.
      Not the train split: there posterior_var and latent_kl are in-sample for the latent.
    * Without one (no learned features): the built-in train and val splits less any evaluated idiom.

    So the probe runs on any data, a user's file included. ``trained`` (the checkpoint's recorded
    training idioms, as hashes) is left out too, whatever its data spec says: a latent trained on
    chosen items (``vtrans crossval``) records a spec that does not describe them.

    Returns:
        The items (possibly none) and a short description of their source.

    Raises:
        ProbeUnfittable: the checkpoint does not record its training data, or it cannot be read.
    """
    evaluated_keys = {_idiom_key(it.idiom) for it in evaluated}
    if trained_with is None:
        source = "builtin:train+val"
        candidates = load_split("builtin", "train") + load_split("builtin", "val")
        excluded: set[str] = set()
    else:
        if not isinstance(trained_with.get("data"), str):
            raise ProbeUnfittable("the checkpoint does not record the data its latent was trained on")
        spec = trained_with["data"]
        split = {k: trained_with[k] for k in ("seed", "val_fraction", "test_fraction") if k in trained_with}
        source = f"the val split of {spec} (seed {split.get('seed', 0)}), held out from the checkpoint's training"
        try:
            candidates = load_split(spec, "val", **split)
            excluded = {_idiom_key(it.idiom) for it in load_split(spec, "train", **split)}
        except DataError as err:
            raise ProbeUnfittable(f"the checkpoint's training data cannot be read: {err}") from None
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
        recorded: the checkpoint's (``vtrans.checkpoint.split_settings``): they apply where the
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
        trained: the checkpoint's training idioms (``vtrans.checkpoint.trained_idiom_hashes``);
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
            "not seen (or --keep-seen to score them anyway)"
        )
    return unseen, seen


def evaluate(
    config: EvalConfig,
    out_dir: str | Path,
    ckpt: str | None = None,
    model: str = "smollm2",
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run the comparison and write the contract's files into ``out_dir``; returns results.json's content."""
    from vtrans import checkpoint
    from vtrans.loading import Backbone

    out = Path(out_dir)
    split = split_settings(config, checkpoint.split_settings(ckpt) if ckpt is not None else None)
    items = load_split(config.data, config.split, **split)
    trained = checkpoint.trained_idiom_hashes(ckpt) if ckpt is not None else None
    checked = len(items)
    items, seen = leave_out_seen(items, trained, config.keep_seen, config.data)
    if config.max_items:
        items = items[: config.max_items]
    if len(items) < 2:
        raise ConfigError(f"{config.data} ({config.split}) has {len(items)} item(s): need at least 2 to evaluate")
    if ckpt is not None:
        module = checkpoint.load(ckpt, device=device)
        backbone = module.backbone
        model_name = backbone.name
    else:
        module, backbone, model_name = None, Backbone(model).to(device), model
    dropped: dict[str, str] = {}  # estimators asked for but not run, and why
    for name in config.estimators:
        if module is None and name in NEEDS_LATENT:
            dropped[name] = "needs a trained latent (--ckpt)"
        elif module is not None and name == "latent_kl" and module.latent.prior != "conditional":
            dropped[name] = "needs a latent trained with prior: conditional"
        elif config.aggregate != "first" and name in FIRST_TOKEN_ONLY:
            dropped[name] = "reads the first completion token only: run it with --aggregate first"
    names = [n for n in config.estimators if n not in dropped]
    harness = Harness(backbone, module, config, progress)
    with _eager_attention(backbone.model, "attention_entropy" in names or "probe" in names):
        # the lens always runs: every row of scores.jsonl carries its trajectory (one forward)
        scored = harness.score(items, names if "lens_ce" in names else [*names, "lens_ce"])
        probe_families = [f for f in PROBE_FAMILIES if f != "latent" or module is not None]
        probe_fit = None  # which items the probe was fitted on
        if "probe" in names:
            start = time.perf_counter()
            try:
                trained_with = None if ckpt is None else checkpoint.read(ckpt).get("datamodule_hyper_parameters", {})
                train_items, source = probe_train_items(items, trained_with, trained)
                probe_fit = {"source": source, "n": len(train_items)}
                if not train_items:
                    raise ProbeUnfittable(f"no item of {source} is left to fit it on once the evaluated ones are out")
                scored.scores["probe"] = fit_probe(harness, train_items, scored)
            except ProbeUnfittable as err:
                names.remove("probe")
                dropped["probe"] = f"cannot be fitted: {err}"
            scored.seconds["probe_fit"] = time.perf_counter() - start
    rows = _rows(scored, names)
    cost = costs(scored.seconds, names, probe_families)
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
    if probe_fit is not None:
        extra["probe_fit"] = probe_fit
    results = report.build_results(
        model_name, rows, cost, n_boot=config.n_boot, seed=config.seed, reference=CHEAP_BASELINES, extra=extra
    )
    out.mkdir(parents=True, exist_ok=True)
    report.write_scores_jsonl(out / "scores.jsonl", rows)
    report.write_results_json(out / "results.json", results)
    plots = report.plot_all(out, rows, results)
    report.write_report_md(out / "report.md", results, plots)
    return results


def _rows(scored: Scored, names: list[str]) -> list[dict]:
    rows = []
    for i, (item, prompt, comp, ok) in enumerate(
        zip(scored.items, scored.prompts, scored.completions, scored.correct, strict=True)
    ):
        row = {
            "idiom": item.idiom,
            "prompt": prompt,
            "target": item.target,
            "completion": comp.text.strip(),
            "completion_word": comp.word,
            "correct": ok,
            "scores": {n: float(scored.scores[n][i]) for n in names if n in scored.scores},
            "lens_ce_by_layer": [] if scored.lens_by_layer is None else scored.lens_by_layer[i].tolist(),
        }
        if scored.lens_gold_by_layer is not None:
            row["lens_ce_gold_by_layer"] = scored.lens_gold_by_layer[i].tolist()
        rows.append(row)
    return rows


@contextlib.contextmanager
def _eager_attention(model, needed: bool) -> Iterator[None]:
    """Switch a model to eager attention (which returns weights) for a block, then back."""
    saved = model.config._attn_implementation
    try:
        if needed and saved != "eager":
            model.set_attn_implementation("eager")
        yield
    finally:
        if model.config._attn_implementation != saved:
            model.set_attn_implementation(saved)
