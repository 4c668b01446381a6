"""The settings of the commands: one dataclass each, each default written once.

``vtrans evaluate``, ``vtrans score`` and ``vtrans crossval`` take these settings from their
typed signatures (jsonargparse), so ``--config FILE`` and ``--print_config`` work for all
three: :class:`EstimatorConfig` (how the estimators run), :class:`EvalConfig` (adds the data
and the report's), :class:`CrossvalConfig` (the cross-fitting's). This module imports neither
torch nor the estimators, so that building a parser (``--help``) takes a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vtrans.data import DEFAULT_TEMPLATE, validate_template
from vtrans.errors import ConfigError

Aggregate = Literal["first", "mean", "max", "last"]
ZDraws = Literal["random", "antithetic", "sobol"]


@dataclass
class EstimatorConfig:
    """How the estimators run.

    Attributes:
        passes: MC dropout passes T.
        dropout: MC dropout probability p.
        mc_from_layer: MC dropout keeps blocks below this one deterministic (read off the shared forward).
        samples: samples of z for ``latent_mi`` and ``latent_nll``.
        z_draws: how the z noise is drawn: ``random``, ``antithetic`` or ``sobol`` (randomised
            quasi-Monte Carlo).
        aggregate: token scores over the answer's tokens: ``first``, ``mean``, ``max`` or ``last``
            (the answer's last token); the estimators that read the first token only run with
            ``first`` alone.
        answer_words: K, the words of each answer: an item's target is its idiom's last K words,
            the completion's answer its first K (generation runs until they are complete), and
            the item is correct when they are equal; the estimators read every answer token.
        batch_size: prompts per forward.
        max_new_tokens: generation budget per answer word (K words get K times as many tokens).
        sample: sample completions instead of greedy decoding.
        temperature: sampling temperature of the completions.
        seed: seed of sampled completions, dropout masks and z noise (the global random state is untouched).
        agreement_samples: completions K sampled per prompt for ``sample_disagreement``,
            ``sample_word_entropy`` and ``cocoa``.
        agreement_temperature: sampling temperature of those K completions.
    """

    passes: int = 16
    dropout: float = 0.1
    mc_from_layer: int = 0
    samples: int = 32
    z_draws: ZDraws = "random"
    aggregate: Aggregate = "first"
    answer_words: int = 1
    batch_size: int = 32
    max_new_tokens: int = 6
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    agreement_samples: int = 10
    agreement_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_all(
            [
                (self.passes >= 2, f"passes must be >= 2, got {self.passes}"),
                (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
                (self.mc_from_layer >= 0, f"mc_from_layer must be >= 0, got {self.mc_from_layer}"),
                (self.samples >= 2, f"samples must be >= 2, got {self.samples}"),
                (
                    self.z_draws in ("random", "antithetic", "sobol"),
                    f"z_draws must be random, antithetic or sobol, got {self.z_draws!r}",
                ),
                (
                    self.aggregate in ("first", "mean", "max", "last"),
                    f"aggregate must be first, mean, max or last, got {self.aggregate!r}",
                ),
                (self.answer_words >= 1, f"answer_words must be >= 1, got {self.answer_words}"),
                (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
                (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
                (self.agreement_samples >= 2, f"agreement_samples must be >= 2, got {self.agreement_samples}"),
                (
                    self.agreement_temperature > 0,
                    f"agreement_temperature must be > 0, got {self.agreement_temperature}",
                ),
            ]
        )


@dataclass
class EvalConfig(EstimatorConfig):
    """Settings of a comparative run: the estimators' (:class:`vtrans.config.EstimatorConfig`),
    plus the data and the report's.

    Attributes:
        data: data spec (``builtin``, ``builtin:test``, ``txt:PATH``, ...).
        split: split to evaluate when the spec names none (``train``, ``val``, ``test``, ``all``).
        template: prompt template with one ``{prefix}`` field.
        estimators: names to run; null: every one that applies (``vtrans estimators`` lists them).
            The names are checked where a run starts (``vtrans.estimators.registry.chosen``):
            this module knows no estimator, so that it imports nothing heavy.
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
    estimators: list[str] | None = None
    n_boot: int = 1000
    max_items: int | None = None
    keep_seen: bool = False
    split_seed: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_template(self.template)
        check_all(
            [
                (self.n_boot >= 100, f"n_boot must be >= 100, got {self.n_boot}"),
                (self.max_items is None or self.max_items >= 1, f"max_items must be >= 1, got {self.max_items}"),
            ]
        )


MEMBER_SEED_STRIDE = 1000


@dataclass
class CrossvalConfig:
    """Settings of a cross-fitted run.

    Attributes:
        config: the training YAML (``configs/NAME.yaml``): backbone, latent settings, batch
            size, template and epochs come from it.
        data: the idioms to cross-fit and score (a data spec); default: the config's data.
        extra_train: a data spec whose idioms are added to every fold's training set (never
            scored; any idiom also in ``data`` is left out of it). With ``folds=1`` the latent
            trains on these alone and scores all of ``data``.
        folds: K, the number of folds (1 only with ``extra_train``).
        seeds: training seeds; each also seeds the z draws, dropout masks and sampled completions.
        fold_seed: seed of the fold assignment (the same for every training seed).
        epochs: training epochs per fold (default: the config's ``trainer.max_epochs``).
        save_checkpoints: keep each fold's latent as ``OUT/checkpoints/seed{s}-fold{f}.ckpt``.
        from_checkpoints: a folder of such checkpoints (an earlier run's ``OUT/checkpoints``):
            each fold's latent is loaded instead of trained, to score new estimators without
            retraining. Each must have been trained on exactly this fold's training idioms.
        template: prompt template (default: the training config's).
        self_targets: also train on the base model's own completion word as a second target of
            every training prompt whose completion differs from the idiom's last word, so that
            the latent must cover both answers where the model goes wrong (training idioms only:
            no scored item's completion or label enters its latent).
        ensemble: M, the latents trained per seed and fold from their own seeds (member m of
            seed s trains with seed s + 1000·m; member 0 is the seed's own latent, which every
            other latent estimator reads); M >= 2 adds the ensemble's estimators (``ensemble_*``).
        refit_spread: each fold's latent trains on all but a third of its training idioms
            (dealt by a hash seeded with ``fold_seed`` and the fold), and its prior's spread is
            refit on that third, which it never trained on (``vtrans.latent.refit``); adds the
            ``refit_*`` estimators. Every latent estimator then reads that latent.
        eval: estimator settings (estimators, passes, samples, batch size, ...); its ``seed``
            is replaced by each training seed and its ``data``, ``split`` and ``template`` are not used.
    """

    config: str
    data: str | None = None
    extra_train: str | None = None
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    fold_seed: int = 0
    epochs: int | None = None
    save_checkpoints: bool = False
    from_checkpoints: str | None = None
    template: str | None = None
    self_targets: bool = False
    ensemble: int = 1
    refit_spread: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)

    def member_seed(self, seed: int, member: int) -> int:
        """The training seed of ensemble member ``member`` of training seed ``seed``."""
        return seed + MEMBER_SEED_STRIDE * member

    def __post_init__(self) -> None:
        if self.folds < 1:
            raise ConfigError(f"folds must be >= 1, got {self.folds}")
        if self.folds == 1 and self.extra_train is None:
            raise ConfigError("folds=1 trains on nothing but --extra_train: give --extra_train SPEC or use folds >= 2")
        if not self.seeds:
            raise ConfigError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.ensemble < 1:
            raise ConfigError(f"ensemble must be >= 1 latent per seed and fold, got {self.ensemble}")
        members = {self.member_seed(s, m) for s in self.seeds for m in range(self.ensemble)}
        if len(members) != len(self.seeds) * self.ensemble:
            raise ConfigError(
                f"with ensemble={self.ensemble} the seeds must differ by less than {MEMBER_SEED_STRIDE} "
                f"(member m of seed s trains with seed s + {MEMBER_SEED_STRIDE}·m), got {self.seeds}"
            )


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Raise :class:`ConfigError` with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
