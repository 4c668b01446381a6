"""``p_wrong``: the probability that a completion is wrong, from one score, as a latent carries it.

A score ranks completions; a user acts on a probability. A :class:`Calibration` maps the
score of :data:`RECOMMENDED` (the estimator the confirmatory run supports) to p(wrong | score).
It is fitted during training on the validation split, idioms the latent never trained on
(``vtrans.latent.calibrate.Calibrate``), saved with the latent (a checkpoint's
``"calibration"``, a ``save_pretrained`` folder's ``config.json``) and applied by the scorer.

Two maps are fitted, both non-decreasing in the score (higher scores are more uncertain):

- **Platt scaling**: σ(a·z + b) on the standardised score z, by maximum likelihood (Newton's method
  on the two parameters, a tiny ridge on ``a`` so that classes a score separates perfectly
  still give a finite fit);
- **isotonic regression**: the pool-adjacent-violators fit of the 0/1 errors on the score, linear
  between the means of its blocks and flat past the ends.

Which one a latent carries is chosen on the validation items themselves: each is fitted on
four of five folds and scored by its Brier score on the fifth, and the lower mean wins (Platt
on a tie, the smaller model); the winner is then refitted on all of them. Too few items, or
too few of either class, and no map is fitted: the reason is saved instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

RECOMMENDED = "adapter_nll"
"""The estimator whose score ``p_wrong`` reads: the one the preregistered confirmatory run supports."""
METHODS = ("platt", "isotonic")
RIDGE = 1e-3
CV_FOLDS = 5
MIN_ITEMS, MIN_PER_CLASS = 20, 5


def finite(s: np.ndarray) -> np.ndarray:
    """±inf moved just past the finite extremes (their order kept), so that a fit can read them."""
    s = np.asarray(s, dtype=np.float64)
    kept = s[np.isfinite(s)]
    if kept.size == 0:
        return np.zeros_like(s)
    lo, hi = kept.min(), kept.max()
    span = max(hi - lo, 1.0)
    return np.clip(np.nan_to_num(s, nan=hi + span, posinf=hi + span, neginf=lo - span), lo - span, hi + span)


def fit_platt(scores: np.ndarray, errors: np.ndarray, steps: int = 50) -> dict[str, float]:
    """Platt scaling's parameters on these items: ``{"mean", "sd", "a", "b"}``, p = σ(a·(s − mean)/sd + b).

    Raises:
        ValueError: the items are all of one class (no probability to fit but a constant).
    """
    s, y = finite(scores), np.asarray(errors, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("Platt scaling needs both correct and wrong items")
    mean, sd = float(s.mean()), float(max(s.std(), 1e-12))
    x = np.stack([(s - mean) / sd, np.ones_like(s)], 1)  # (n, 2)
    w = np.array([0.0, np.log(y.mean() / (1 - y.mean()))])
    penalty = np.diag([RIDGE * len(y), 0.0])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + penalty @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return {"mean": mean, "sd": sd, "a": float(w[0]), "b": float(w[1]), "lo": float(s.min()), "hi": float(s.max())}


def fit_isotonic(scores: np.ndarray, errors: np.ndarray) -> dict[str, list[float]]:
    """The pool-adjacent-violators fit of the errors on the scores (tied scores first pooled), as
    the knots of :func:`predict` (``{"x", "y"}``): each block's lowest and highest score, both at
    the block's error rate, so that the fit is flat over a block and linear between blocks."""
    s, y = finite(scores), np.asarray(errors, dtype=np.float64)
    values, which = np.unique(s, return_inverse=True)
    blocks: list[list[float]] = []  # [lowest score, highest score, sum of errors, count]
    for value, total, count in zip(values, np.bincount(which, weights=y), np.bincount(which), strict=True):
        blocks.append([value, value, total, float(count)])
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][3] >= blocks[-1][2] / blocks[-1][3]:
            last = blocks.pop()
            blocks[-1] = [blocks[-1][0], last[1], blocks[-1][2] + last[2], blocks[-1][3] + last[3]]
    x, p = [], []
    for lo, hi, total, count in blocks:
        x += [lo] if lo == hi else [lo, hi]
        p += [total / count] * (1 if lo == hi else 2)
    return {"x": [float(v) for v in x], "y": [float(v) for v in p]}


def predict(method: str, params: dict, scores: np.ndarray) -> np.ndarray:
    """p(wrong) of each score under a fitted map; +inf and NaN read as the most uncertain score fitted."""
    s = np.asarray(scores, dtype=np.float64)
    if method == "platt":
        s = np.where(np.isfinite(s), s, np.where(s < 0, params["lo"], params["hi"]))
        return 1 / (1 + np.exp(-(((s - params["mean"]) / params["sd"]) * params["a"] + params["b"])))
    x, y = np.asarray(params["x"]), np.asarray(params["y"])
    s = np.where(np.isfinite(s), s, np.where(s < 0, x[0], x[-1]))
    return np.interp(s, x, y)  # flat past the ends


def _fit(method: str, scores: np.ndarray, errors: np.ndarray) -> dict:
    return fit_platt(scores, errors) if method == "platt" else fit_isotonic(scores, errors)


def cv_brier(scores: np.ndarray, errors: np.ndarray, folds: int = CV_FOLDS) -> dict[str, float]:
    """Each method's mean Brier score over ``folds`` folds (item i in fold i mod folds), fitted on the others."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    which = np.arange(len(s)) % folds
    out = {}
    for method in METHODS:
        squared = np.empty(len(s))
        for k in range(folds):
            inside = which == k
            try:
                p = predict(method, _fit(method, s[~inside], y[~inside]), s[inside])
            except ValueError:  # the other folds are of one class: their rate is all there is
                p = np.full(int(inside.sum()), y[~inside].mean())
            squared[inside] = (p - y[inside]) ** 2
        out[method] = float(squared.mean())
    return out


@dataclass(frozen=True)
class Calibration:
    """A fitted map from one estimator's score to p(wrong), with where it was fitted."""

    estimator: str
    method: str  # platt | isotonic
    params: dict
    n: int  # items it was fitted on
    n_wrong: int
    cv_brier: dict[str, float] = field(default_factory=dict)  # the choice: each method's held-out Brier score
    fitted_on: str = "validation split"
    step: int = -1  # the training step of the latent it was fitted on
    idioms: list[str] = field(default_factory=list)  # what it was fitted on, as vtrans.data.idiom_hash values
    answer_words: int = 1  # K of the answers it was fitted on: p(wrong) of an answer of K words

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """p(wrong) of each score of :attr:`estimator`."""
        return predict(self.method, self.params, scores)

    def describe(self) -> str:
        return f"{self.method} on {self.estimator}, fitted on {self.n} items ({self.n_wrong} wrong) of the {self.fitted_on}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> Calibration:
        """The calibration a saved record holds.

        Raises:
            ValueError: a record that is not one :meth:`to_dict` wrote.
        """
        try:
            calibration = cls(**record)
        except TypeError as err:
            raise ValueError(f"not a calibration record: {err}") from None
        keys = {"platt": {"mean", "sd", "a", "b", "lo", "hi"}, "isotonic": {"x", "y"}}.get(calibration.method)
        if keys is None or not isinstance(calibration.params, dict) or set(calibration.params) != keys:
            raise ValueError(f"not a calibration record: method {calibration.method!r} with parameters {calibration.params!r}")
        return calibration


def fit(
    scores: np.ndarray,
    errors: np.ndarray,
    estimator: str = RECOMMENDED,
    fitted_on: str = "validation split",
    step: int = -1,
    idioms: list[str] | None = None,
    answer_words: int = 1,
) -> Calibration | str:
    """The calibration of ``estimator``'s scores on these items (``errors``: 1 where wrong;
    ``idioms``: their hashes, recorded), the method chosen by :func:`cv_brier`; or why none is
    fitted (too few items, or of a class)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    wrong = int(y.sum())
    if len(y) < MIN_ITEMS or min(wrong, len(y) - wrong) < MIN_PER_CLASS:
        return (
            f"the {fitted_on} has {len(y)} items, {wrong} wrong: a calibration needs {MIN_ITEMS} or more, "
            f"with {MIN_PER_CLASS} or more of each class"
        )
    brier = cv_brier(s, y)
    method = min(METHODS, key=lambda m: (brier[m], METHODS.index(m)))
    params = _fit(method, s, y)
    return Calibration(estimator, method, params, len(y), wrong, brier, fitted_on, step, sorted(idioms or []), answer_words)
