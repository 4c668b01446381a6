"""Every estimator family, in report order: the one list the runner, the runs, the report and the CLI read.

Adding an estimator is one new file in this package that defines a ``Family`` (its names with
one line of help each, what it needs, how it reads the shared forward or is fitted, any posterior
it reads and how it is shown; see ``vtrans.estimators.base``) and one entry in ``FAMILIES`` below;
the runs, the report and the CLI need no edit. The names are a contract: other tools read them.

The functions below read ``FAMILIES`` when called (a family added at run time takes part); the
constants are the families as imported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from vtrans.errors import ConfigError
from vtrans.estimators import (
    adapter,
    attention,
    baselines,
    ensemble,
    laplace,
    latent,
    latent_answer,
    lens,
    margin,
    mc_dropout,
    mc_dropout_answer,
    probe,
    probe_latent,
    sampling,
    se_probe,
    sequence,
    spread,
    state_probe,
    states,
)
from vtrans.estimators.base import NEEDS, Family, Posterior, Setting

FAMILIES: tuple[Family, ...] = (
    baselines.FAMILY,
    margin.FAMILY,
    sequence.FAMILY,
    attention.FAMILY,
    lens.FAMILY,
    mc_dropout.FAMILY,
    mc_dropout_answer.FAMILY,
    latent.ENCODERS,
    latent.SAMPLES,
    adapter.FAMILY,
    latent_answer.FAMILY,
    ensemble.FAMILY,
    laplace.FAMILY,
    spread.PRIOR,
    spread.SAMPLES,
    sampling.FAMILY,
    states.FAMILY,
    probe.FAMILY,
    probe_latent.FAMILY,
    state_probe.FAMILY,
    state_probe.WITH_LATENT,
    se_probe.FAMILY,
)
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
NAMES: tuple[str, ...] = tuple(name for f in FAMILIES for name in f.names)
FIRST_TOKEN_ONLY = frozenset(n for f in FAMILIES if f.first_token_only for n in f.names)
SCORE_DEFAULTS: tuple[str, ...] = tuple(n for f in FAMILIES if f.shown.default_score for n in f.names)
SCORABLE: tuple[str, ...] = tuple(n for f in FAMILIES if f.fitted is None for n in f.names)
"""What ``vtrans score`` can run: every name that is not fitted on labelled items."""


def chosen(names: list[str] | None) -> list[str]:
    """The estimators a run asks for: ``names``, or every one for ``None``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    known = [n for f in FAMILIES for n in f.names]
    if names is None:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown estimator(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return list(names)


def family_of(name: str) -> Family:
    """The family of an estimator name or of a feature key (``Family.features``)."""
    for family in FAMILIES:
        if name in family.names or name in family.features:
            return family
    raise KeyError(name)


def needs_latent(name: str) -> bool:
    """Whether ``name`` reads a trained latent."""
    return "latent" in family_of(name).needs_of(name)


def fitted(names: Sequence[str]) -> list[str]:
    """The fitted ones of ``names`` (their family is ``fitted``), in order; unknown names are not."""
    fit = {n for f in FAMILIES if f.fitted is not None for n in f.names}
    return [n for n in names if n in fit]


def fields() -> tuple[str, ...]:
    """Every per-item field a family writes into the rows besides its scores, in report order."""
    return tuple(key for f in FAMILIES for key in f.fields)


def tokens() -> tuple[str, ...]:
    """Every per-token value a family writes into the rows when it runs (``Family.tokens``), in report order."""
    return tuple(key for f in FAMILIES for key in f.tokens)


def per_item(key: str, value: torch.Tensor) -> list:
    """One item's field or per-token value as the rows write it: a per-token one cut to the answer's tokens."""
    values = value.tolist()
    if key in tokens():
        values = [v for v in values if v == v]  # NaN pads past the answer's end
    return values


def features() -> tuple[str, ...]:
    """Every per-item feature a family returns for fitted families only (``Family.features``)."""
    return tuple(key for f in FAMILIES for key in f.features)


def writer_of(key: str) -> str:
    """The estimator whose run yields ``key``: the name itself (a feature's key too: a run keeps it
    only when asked for it), or for a field its family's first name."""
    for family in FAMILIES:
        if key in family.names or key in family.features:
            return key
        if key in family.fields:
            return family.names[0]
    raise KeyError(key)


def with_fields(names: Sequence[str]) -> list[str]:
    """``names`` and, for every family that writes per-item fields, one of its names: what a run
    computes so that each row carries every field."""
    writers = [f.names[0] for f in FAMILIES if f.fields and not any(n in f.names for n in names)]
    return [*names, *writers]


def computed(names: Sequence[str], fitting: bool = False) -> list[str]:
    """What the runner computes for ``names``: each one that reads, and for a fitted one the
    estimators that give its features (with ``fitting``, of items it is fitted on: its targets
    too); once each, fitted ones left out."""
    wanted = list(names)
    for name in fitted(names):
        fit = family_of(name).fitted
        wanted += [writer_of(key) for key in (*fit.features, *(fit.targets if fitting else ()))]
    return [n for n in dict.fromkeys(wanted) if family_of(n).fitted is None]


def references() -> tuple[str, ...]:
    """The names that may serve as the reference baseline, in report order."""
    return tuple(n for f in FAMILIES if f.shown.reference for n in f.names)


def reference_of(aurocs: Mapping[str, float], among: Sequence[str] | None = None) -> str:
    """The reference every estimator is paired against: of ``among`` (default :func:`references`),
    the one in ``aurocs`` with the highest AUROC (an undefined one lowest; on a tie the first);
    ``""`` when none is there."""
    present = [n for n in (references() if among is None else among) if n in aurocs]
    if not present:
        return ""
    return max(present, key=lambda n: np.nan_to_num(aurocs[n], nan=-1.0))


def setting(module=None, aggregate: str = "first", members: int = 0, posteriors: Collection[str] = ()) -> Setting:
    """The :class:`Setting` of a run.

    Args:
        module: the trained latent (a ``LatentModel``), or only its prior's name (``standard``,
            ``conditional``, ``deterministic``: what a checkpoint records, so that a request is
            checked before anything loads); None without a checkpoint.
        members: the latents of the ensemble there is (0 or 1: none).
        posteriors: the names of the posteriors fitted on the latent that there are (``Context.posteriors``).
    """
    prior = module if module is None or isinstance(module, str) else module.latent.prior
    return Setting(prior, aggregate, members, frozenset(posteriors))


def why_not(
    name: str, module=None, aggregate: str = "first", members: int = 0, posteriors: Collection[str] = ()
) -> str | None:
    """Why ``name`` cannot run with this latent, aggregate, ensemble and posteriors (see
    :func:`setting`), or None when it can."""
    return family_of(name).why_not(name, setting(module, aggregate, members, posteriors))


def posteriors_for(names: Sequence[str], setting: Setting) -> list[Posterior]:
    """The posteriors to fit for ``names`` in ``setting``: each one read by a name that could run
    once it is there, once each."""
    found = []
    for name in names:
        family = family_of(name)
        if family.posterior is not None and family.why_not(name, setting, posterior=False) is None:
            found.append(family.posterior)
    return list(dict.fromkeys(found))


def users_of(posterior: Posterior) -> list[Family]:
    """The families that read ``posterior``, in report order."""
    return [f for f in FAMILIES if f.posterior is posterior]


def table() -> str:
    """A plain-text table of every estimator: its family, what it needs, whether ``score`` runs
    it by default, and its line of help."""
    rows = [("name", "family", "needs", "score", "what it measures (higher = more uncertain)")]
    for family in FAMILIES:
        for name in family.names:
            needs = [key for key in NEEDS if key in family.needs_of(name) and NEEDS[key].unmet is not None]
            needs += [family.posterior.name] if family.posterior else []
            needs += [("labels" if family.fitted.labels else "unlabelled prompts")] if family.fitted else []
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
    "needs_latent",
    "SCORABLE",
    "chosen",
    "computed",
    "family_of",
    "features",
    "fields",
    "per_item",
    "tokens",
    "fitted",
    "posteriors_for",
    "reference_of",
    "references",
    "setting",
    "users_of",
    "why_not",
    "with_fields",
    "writer_of",
]
