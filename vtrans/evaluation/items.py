"""Which items a comparative run evaluates, and whether they are enough.

The split is the checkpoint's where it records one (:func:`split_settings`), the idioms its latent
was trained on are left out (:func:`leave_out_seen`), and before any work the run says on stderr
(``vtrans.log``) what it will evaluate: the items loaded, those left out as seen in the latent's
training, the n that remains, and a warning when n is too small for the AUROC intervals to
separate estimators (:func:`auroc_half_width`).
"""

from __future__ import annotations

import math

from vtrans.config import EvalConfig
from vtrans.data import IdiomItem, idiom_hash, parse_spec
from vtrans.errors import ConfigError
from vtrans.log import log

# A 95% AUROC interval narrower than ±0.05 keeps two estimators 0.1 apart from overlapping; a
# wider one cannot separate even that (a large gap: cheap baselines usually lie closer).
SEPARATING_HALF_WIDTH = 0.05
# the AUROC at which the expected interval is quoted: a useful estimator, far from perfect
TYPICAL_AUROC = 0.75


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
    (``tests/evaluation/test_evaluate.py`` checks both against synthetic data).

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
