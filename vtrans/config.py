"""The estimator settings: one dataclass, each default written once.

``vtrans evaluate``, ``vtrans score`` and ``vtrans crossval`` take these settings from their
typed signatures (jsonargparse), so ``--config FILE`` and ``--print_config`` work for all
three; :class:`vtrans.evaluate.EvalConfig` adds the data and the report's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtrans.errors import ConfigError

Aggregate = Literal["first", "mean", "max"]
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
        aggregate: token scores over the completion word: ``first``, ``mean`` or ``max``; the
            estimators that read the first token only are not run with ``mean`` or ``max``.
        batch_size: prompts per forward.
        max_new_tokens: generation budget for the completion word.
        sample: sample completions instead of greedy decoding.
        temperature: sampling temperature of the completions.
        seed: seed of sampled completions, dropout masks and z noise (the global random state is untouched).
        agreement_samples: completions K sampled per prompt for ``sample_disagreement`` and
            ``sample_word_entropy``.
        agreement_temperature: sampling temperature of those K completions.
    """

    passes: int = 16
    dropout: float = 0.1
    mc_from_layer: int = 0
    samples: int = 32
    z_draws: ZDraws = "random"
    aggregate: Aggregate = "first"
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
                    self.aggregate in ("first", "mean", "max"),
                    f"aggregate must be first, mean or max, got {self.aggregate!r}",
                ),
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


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Raise :class:`ConfigError` with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
