"""The report's plots, as PNG files: ROC curves, the lens by layer, score histograms, risk-coverage; the seed forest.

Plots use :class:`matplotlib.figure.Figure` directly, not pyplot: no global backend or figure
registry is touched, and a figure is freed as soon as it is saved and goes out of scope.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vtrans.evaluation import metrics
from vtrans.evaluation.report.reliability import plot_reliability
from vtrans.evaluation.report.results import _errors, _float, _score_column
from vtrans.evaluation.report.tables import _by_auroc, _fmt

_DPI = 130
_CORRECT_COLOR = "tab:blue"
_INCORRECT_COLOR = "tab:red"


def _styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One line style per estimator, the same in every plot.

    The first ten get the ten distinct tab10 hues, solid; the next ten the light
    variants of those hues, dashed, so that neighbours in the legend never look alike.
    """
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {
        name: {"color": cmap(2 * (i % 10) + (i // 10) % 2), "ls": "-" if (i // 10) % 2 == 0 else "--"}
        for i, name in enumerate(names)
    }


def _same_ranking(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two score columns rank the items alike, and so draw the same ROC and risk-coverage
    curves: the same items scored, and at no more than one step in 200 of the items sorted by
    both columns does one column rise while the other does not (a swap, or a tie the other breaks).

    The allowance is for float32 rounding, which disturbs a few neighbours: ``lens_ce`` = -log p(ŷ)
    and ``msp`` = 1 - p(ŷ) are computed apart and disagree at 2 of 723 steps on SmolLM2's 724
    items. Each such step moves the AUROC by at most 1 / (errors x correct items), so columns alike
    by this rule agree far beyond the three decimals a legend shows. Distinct estimators disagree
    at a third of the steps or more, and a coarse score against a finer one at every step where
    the coarse one ties (the two sampled-word scores: 1 in 13).
    """
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    keep = ~np.isnan(a)
    a, b = a[keep], b[keep]
    if a.size < 2:
        return False

    def disagreements(x: np.ndarray, y: np.ndarray) -> int:
        order = np.lexsort((y, x))  # by x, ties by y
        return int(np.count_nonzero(np.sign(np.diff(x[order])) != np.sign(np.diff(y[order]))))

    return max(disagreements(a, b), disagreements(b, a)) <= (a.size - 1) // 200


def _alike(rows: Sequence[dict[str, Any]], names: Sequence[str], first: str | None = None) -> dict[str, str]:
    """Each estimator that ranks the items as an earlier one does, mapped to that one.

    ``names`` in drawing order; ``first`` (the reference) leads its group wherever it stands.
    """
    order = sorted(names, key=lambda n: n != first)  # stable: the reference first, the rest as given
    columns = {name: _score_column(rows, name) for name in order}
    leaders: list[str] = []
    alike: dict[str, str] = {}
    for name in order:
        leader = next((lead for lead in leaders if _same_ranking(columns[lead], columns[name])), None)
        if leader is None:
            leaders.append(name)
        else:
            alike[name] = leader
    return alike


# dash patterns of curves drawn over an identical one: its colour shows in their gaps
_OVER_DASHES = ((0, (2, 2.5)), (0, (6, 3, 1.5, 3)), (0, (1, 4)))


def _curve_styles(
    rows: Sequence[dict[str, Any]], results: dict[str, Any], names: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Line styles for curves of every estimator (``_styles``), and the estimators whose curve is
    another's (:func:`_alike`): those are drawn dashed over it, so that both can be seen."""
    styles = {name: {**style, "lw": 1.6, "zorder": 2} for name, style in _styles(names).items()}
    alike = _alike(rows, names, results.get("reference"))
    over: dict[str, int] = {}
    for name, leader in alike.items():
        k = over[leader] = over.get(leader, -1) + 1
        styles[name].update(ls=_OVER_DASHES[k % len(_OVER_DASHES)], lw=2.0, zorder=3 + k)
    return styles, alike


def _curve_label(name: str, value: Any, alike: dict[str, str]) -> str:
    """A legend entry: the estimator, its figure, and whose ranking it repeats."""
    same = f", same ranking as {alike[name]}" if name in alike else ""
    return f"{name} ({_fmt(value)}{same})"


def _scored(rows: Sequence[dict[str, Any]], name: str, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An estimator's scores and the matching errors, NaN-scored items dropped."""
    return metrics.scored(_score_column(rows, name), errors)


def _legend_outside(ax: Axes) -> None:
    """Legend to the right of the axes, so that it hides no curve."""
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)


def _plot_roc(rows: Sequence[dict[str, Any]], results: dict[str, Any], names: list[str]) -> Figure | None:
    """ROC curves of every estimator, the chance diagonal, AUROC in the legend.

    A curve that repeats another's (the same ranking of the items) is drawn dashed over it.
    """
    errors = _errors(rows)
    styles, alike = _curve_styles(rows, results, names)
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    drawn = 0
    for name in names:
        fpr, tpr = metrics.roc_curve(*_scored(rows, name, errors))
        if fpr.size:
            auc = results["estimators"][name].get("auroc")
            ax.plot(fpr, tpr, **styles[name], label=_curve_label(name, auc, alike))
            drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="chance (0.500)")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        aspect="equal",
        xlabel="false-positive rate (correct items flagged)",
        ylabel="true-positive rate (errors flagged)",
        title=f"ROC: detecting incorrect completions — {results.get('model', '')}",
    )
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def _lens_curve(row: dict[str, Any]) -> np.ndarray:
    """An item's lens cross-entropy by layer as a float array (empty if absent, null -> NaN)."""
    values = row.get("lens_ce_by_layer")
    return np.empty(0) if values is None else np.asarray(values, dtype=np.float64).ravel()


def _lens_matrix(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(items, layers) lens cross-entropies and the items' errors; None without lens data.

    Only rows whose ``lens_ce_by_layer`` has the most common length are used.
    """
    curves = [_lens_curve(row) for row in rows]
    lengths = Counter(c.size for c in curves if c.size)
    if not lengths:
        return None
    n_layers = lengths.most_common(1)[0][0]
    keep = [i for i, c in enumerate(curves) if c.size == n_layers]
    return np.stack([curves[i] for i in keep]), _errors(rows)[keep]


def _mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard error, ignoring NaN (s.e. 0 for a single item)."""
    count = np.sum(~np.isnan(values), axis=0)
    mean = np.nanmean(values, axis=0)
    std = np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else np.zeros_like(mean)
    return mean, np.nan_to_num(std / np.sqrt(np.maximum(count, 1)))


def _plot_lens_by_layer(
    rows: Sequence[dict[str, Any]], results: dict[str, Any], names: list[str]
) -> Figure | None:
    """Mean lens cross-entropy per layer for correct vs incorrect items, ±1 s.e. band.

    The y-axis is logarithmic when the means span more than a factor of 4: the embedding layer
    (0) can sit several times above the blocks (about 110 nats against 20-35 on SmolLM2), which
    on a linear axis flattens every other layer and merges the last layers' few nats into the
    axis. A narrower span (a random model's ~10 nats at every layer) keeps a linear axis.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    data = _lens_matrix(rows)
    if data is None:
        return None
    matrix, errors = data
    layers = np.arange(matrix.shape[1])
    groups = [
        (label, matrix[errors == is_error], color)
        for label, is_error, color in (("correct", 0, _CORRECT_COLOR), ("incorrect", 1, _INCORRECT_COLOR))
        if np.any(errors == is_error)
    ]
    curves = [(label, group.shape[0], *_mean_and_se(group), color) for label, group, color in groups]
    means = np.concatenate([mean for _, _, mean, _, _ in curves])
    means = means[np.isfinite(means)]
    log_scale = means.size > 0 and means.min() > 0 and means.max() > 4 * means.min()
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for label, count, mean, se, color in curves:
        ax.plot(layers, mean, color=color, lw=1.8, marker="o", ms=3, label=f"{label} (n={count})")
        # on a log axis a band reaching 0 would stretch it: there its floor is half the mean
        low = np.maximum(mean - se, mean / 2) if log_scale else mean - se
        ax.fill_between(layers, low, mean + se, color=color, alpha=0.25, lw=0)
    if log_scale:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="layer (0: the embeddings)",
        ylabel="cross-entropy vs generated token (nats" + (", log scale)" if log_scale else ")"),
        title=f"Logit-lens cross-entropy by layer (mean ± 1 s.e.) — {results.get('model', '')}",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _readable_ticks(ax: Axes) -> None:
    """At most five short tick labels per axis of a small panel: scores of 1e-5 (``mc_dropout_var``)
    or 1e4 get a power of ten at the axis end, not seven-character labels that run into each other."""
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    ax.ticklabel_format(style="sci", scilimits=(-3, 4))
    ax.tick_params(labelsize="small")


def _plot_histograms(
    rows: Sequence[dict[str, Any]], results: dict[str, Any], names: list[str]
) -> Figure | None:
    """A grid of per-estimator score histograms, correct and incorrect overlaid."""
    if not names:
        return None
    errors = _errors(rows)
    n_cols = min(4, len(names))
    n_rows = math.ceil(len(names) / n_cols)
    fig = Figure(figsize=(3.4 * n_cols, 2.6 * n_rows + 0.8), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        scores, err = _scored(rows, name, errors)
        scores, err = scores[np.isfinite(scores)], err[np.isfinite(scores)]
        bins = np.histogram_bin_edges(scores, bins=30) if scores.size else 10
        for label, is_error, color in (("correct", 0, _CORRECT_COLOR), ("incorrect", 1, _INCORRECT_COLOR)):
            group = scores[err == is_error]
            if group.size:
                ax.hist(group, bins=bins, density=True, color=color, alpha=0.5, label=label)
        ax.set_title(f"{name} (AUROC {_fmt(results['estimators'][name].get('auroc'))})", fontsize="medium")
        _readable_ticks(ax)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=2)
    fig.suptitle("Score distributions, correct vs incorrect completions")
    fig.supxlabel("score (higher = more uncertain)")
    fig.supylabel("density")
    return fig


def _plot_risk_coverage(
    rows: Sequence[dict[str, Any]], results: dict[str, Any], names: list[str]
) -> Figure | None:
    """Risk vs coverage per estimator, with the oracle and random references.

    A curve that repeats another's (the same ranking of the items) is drawn dashed over it.
    """
    if not rows:
        return None
    errors = _errors(rows)
    styles, alike = _curve_styles(rows, results, names)
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    for name in names:
        coverage, risk = metrics.risk_coverage_curve(*_scored(rows, name, errors))
        if coverage.size:
            aurc = results["estimators"][name].get("aurc")
            ax.plot(coverage, risk, **styles[name], label=_curve_label(name, aurc, alike))
    coverage, risk = metrics.risk_coverage_curve(errors.astype(np.float64), errors)  # errors ranked last
    oracle = metrics.aurc(errors, errors)
    ax.plot(coverage, risk, color="black", ls="-.", lw=1.4, label=f"oracle ({_fmt(oracle)})")
    error_rate = float(errors.mean())
    ax.axhline(error_rate, color="gray", ls=":", lw=1.4, label=f"random ({_fmt(error_rate)})")
    ax.set(
        xlim=(0, 1),
        ylim=(0, None),
        xlabel="coverage (fraction of items kept, most confident first)",
        ylabel="risk (error rate among kept items)",
        title=f"Risk–coverage (AURC in legend, lower is better) — {results.get('model', '')}",
    )
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


_PLOTS: dict[str, Callable[..., Figure | None]] = {
    "roc.png": _plot_roc,
    "lens_by_layer.png": _plot_lens_by_layer,
    "histograms.png": _plot_histograms,
    "risk_coverage.png": _plot_risk_coverage,
    "reliability.png": plot_reliability,
}
_PLOT_TITLES = {
    "roc.png": "ROC curves",
    "lens_by_layer.png": "Lens cross-entropy by layer, correct vs incorrect",
    "histograms.png": "Score histograms",
    "risk_coverage.png": "Risk-coverage curves",
    "reliability.png": "Reliability of the calibrated probabilities of error",
    "auroc_forest.png": "AUROC by estimator: bootstrap interval and each seed",
}


def plot_all(out_dir: str | Path, rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """Write the report's PNG plots.

    ``roc.png`` (ROC curves, AUROC in the legend), ``lens_by_layer.png`` (mean
    lens cross-entropy by layer, correct vs incorrect; skipped without
    ``lens_ce_by_layer`` data), ``histograms.png`` (score histograms per
    estimator) and ``risk_coverage.png`` (with oracle and random). A plot with
    nothing to draw is skipped.

    Args:
        out_dir: folder to write into (created if needed).
        rows: items as in scores.jsonl.
        results: as returned by :func:`build_results`.

    Returns:
        The names of the files written, relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _by_auroc(results)
    written = []
    for file_name, plot in _PLOTS.items():
        fig = plot(rows, results, names)
        if fig is not None:
            fig.savefig(out_dir / file_name, dpi=_DPI, bbox_inches="tight")
            written.append(file_name)
    return written


def plot_seed_forest(out_dir: str | Path, results: dict[str, Any]) -> list[str]:
    """``auroc_forest.png``: each estimator's AUROC with its bootstrap interval and one dot per seed.

    The dashed line is the reference (the best cheap baseline); nothing is written without
    per-seed figures.
    """
    names = [n for n in _by_auroc(results) if "seeds" in results["estimators"][n]]
    if not names:
        return []
    fig = Figure(figsize=(7.5, 0.42 * len(names) + 1.6))
    ax = fig.add_subplot()
    for y, name in enumerate(reversed(names)):
        m = results["estimators"][name]
        lo, hi = (_float(v) for v in (m.get("auroc_ci") or (None, None)))
        ax.plot([lo, hi], [y, y], color="black", lw=1.6)
        ax.plot([_float(m.get("auroc"))], [y], "o", color="black", ms=5)
        seeds = np.asarray(m["seeds"]["auroc"], dtype=np.float64)
        ax.plot(seeds, np.full(seeds.shape, y + 0.22), "|", color="tab:orange", ms=8, mew=1.6)
    reference = results.get("reference")
    if reference in results["estimators"]:
        ax.axvline(_float(results["estimators"][reference].get("auroc")), color="tab:blue", ls="--", lw=1.2)
    ax.axvline(0.5, color="gray", ls=":", lw=1.2)
    ax.set_yticks(range(len(names)), list(reversed(names)))
    ax.set(
        xlabel=f"AUROC (dot and bar: first seed, 95% bootstrap CI; ticks: each seed; dashed: {reference})",
        title=f"Cross-fitted AUROC, n={results.get('n')} — {results.get('model', '')}",
    )
    ax.grid(axis="x", alpha=0.3)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / "auroc_forest.png", dpi=_DPI, bbox_inches="tight")
    return ["auroc_forest.png"]
