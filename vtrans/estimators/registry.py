"""Every estimator family, in report order: the one list the runner, the probe and the CLI read.

Adding an estimator is one new file in this package that defines a ``Family`` (its names with
one line of help each, what it needs, and how it reads the shared forward; see
``vtrans.estimators.base``) and one entry in ``FAMILIES`` below. The names are a contract:
other tools read them.
"""

from __future__ import annotations

from vtrans.errors import ConfigError
from vtrans.estimators import attention, baselines, latent, lens, margin, mc_dropout, probe, sampling
from vtrans.estimators.base import NEEDS, Family

FAMILIES: tuple[Family, ...] = (
    baselines.FAMILY,
    margin.FAMILY,
    attention.FAMILY,
    lens.FAMILY,
    mc_dropout.FAMILY,
    latent.ENCODERS,
    latent.SAMPLES,
    sampling.FAMILY,
    probe.FAMILY,
)
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
NAMES: tuple[str, ...] = tuple(name for f in FAMILIES for name in f.names)
NEEDS_LATENT = frozenset(n for f in FAMILIES for n in f.names if "latent" in f.needs_of(n))
FIRST_TOKEN_ONLY = frozenset(n for f in FAMILIES if f.first_token_only for n in f.names)
PROBE_FEATURES: tuple[str, ...] = tuple(n for f in FAMILIES for n in f.probe_features)
SCORE_DEFAULTS: tuple[str, ...] = tuple(n for f in FAMILIES if f.default_score for n in f.names)
SCORABLE: tuple[str, ...] = tuple(n for f in FAMILIES for n in f.names if "labels" not in f.needs_of(n))
"""What ``vtrans score`` can run: every name that needs no labelled items to be fitted on."""


def chosen(names: list[str] | None) -> list[str]:
    """The estimators a run asks for: ``names``, or every one for ``None``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if names is None:
        return list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ConfigError(f"unknown estimator(s) {', '.join(unknown)}: choose from {', '.join(NAMES)}")
    return list(names)


def family_of(name: str) -> Family:
    for family in FAMILIES:
        if name in family.names:
            return family
    raise KeyError(name)


def why_not(name: str, module=None, aggregate: str = "first") -> str | None:
    """Why ``name`` cannot run with this latent and aggregate, or None when it can.

    Args:
        module: the trained latent (a ``LatentModel``), or only its prior's name (``standard``,
            ``conditional``: what a checkpoint records, so that a request is checked before
            anything loads); None without a checkpoint.
    """
    family = family_of(name)
    needs = family.needs_of(name)
    prior = module if module is None or isinstance(module, str) else module.latent.prior
    if "latent" in needs and prior is None:
        return "needs a trained latent (--ckpt)"
    if "conditional_prior" in needs and prior != "conditional":
        return "needs a latent trained with prior: conditional"
    if family.first_token_only and aggregate != "first":
        return "reads the first completion token only: run it with --aggregate first"
    return None


def help_text(names: tuple[str, ...] = NAMES) -> str:
    """Every estimator with its line of help, on one line."""
    return "; ".join(f"{n}: {family_of(n).help[n]}" for n in names)


def table() -> str:
    """A plain-text table of every estimator: its family, what it needs, whether ``score`` runs
    it by default, and its line of help."""
    rows = [("name", "family", "needs", "score", "what it measures (higher = more uncertain)")]
    for family in FAMILIES:
        for name in family.names:
            needs = sorted(family.needs_of(name) & {"latent", "conditional_prior", "labels"})
            passes = ["extra passes"] if family.extra_passes else []
            default = "default" if name in SCORE_DEFAULTS else ("yes" if name in SCORABLE else "no")
            rows.append((name, family.name, ", ".join(needs + passes) or "-", default, family.help[name]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]]) for row in rows)


__all__ = [
    "BY_NAME",
    "FAMILIES",
    "FIRST_TOKEN_ONLY",
    "NAMES",
    "NEEDS",
    "NEEDS_LATENT",
    "PROBE_FEATURES",
    "SCORABLE",
    "chosen",
    "family_of",
]
