"""Write the outputs of an evaluation: results.json, scores.jsonl, report.md and plots.

The file formats are the contracts of ``docs/design.md``. JSON is always
strict: NaN and infinities are written as ``null``; functions that read
results back (the table and the report) treat ``null`` as "not available".

Plots use :class:`matplotlib.figure.Figure` directly, not pyplot: no global
backend or figure registry is touched, and a figure is freed as soon as it is
saved and goes out of scope.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vtrans.estimators import registry
from vtrans.evaluation import metrics

__all__ = [
    "build_results",
    "item_row",
    "format_table",
    "plot_all",
    "plot_seed_forest",
    "write_crossval_md",
    "write_report_md",
    "write_results_json",
    "write_scores_jsonl",
]

_DPI = 130
_CORRECT_COLOR = "tab:blue"
_INCORRECT_COLOR = "tab:red"


# --------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch values to plain Python, with non-finite floats as None."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays/scalars, torch tensors
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def item_row(
    item: Any,
    prompt: str,
    completion: Any,
    correct: bool,
    scores: dict[str, float],
    fields: dict[str, list[float]],
    fold: int | None = None,
    scores_by_seed: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """One item's row of scores.jsonl.

    Args:
        item: the idiom (a ``vtrans.data.IdiomItem``).
        prompt: its prompt.
        completion: the base model's completion of it (a ``vtrans.backbone.generate.Completion``).
        correct: whether the completion word is the idiom's last word.
        scores: ``{NAME: float}``, the estimators' scores (the first seed's in a cross-fitted run).
        fields: the per-item fields the families write besides their scores
            (``Family.fields``: ``lens_ce_by_layer``, ...), in order.
        fold: the item's fold in a cross-fitted run.
        scores_by_seed: ``{SEED: {NAME: float}}``, the other seeds' scores in a cross-fitted run.
    """
    row: dict[str, Any] = {
        "idiom": item.idiom,
        "prompt": prompt,
        "target": item.target,
        "completion": completion.text.strip(),
        "completion_word": completion.word,
        "correct": bool(correct),
    }
    if fold is not None:
        row["fold"] = fold
    row["scores"] = scores
    if scores_by_seed is not None:
        row["scores_by_seed"] = scores_by_seed
    row.update(fields)
    return row


def write_scores_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per item.

    Args:
        path: output file.
        rows: items as in the contract: ``{"idiom", "prompt", "target",
            "completion", "correct", "scores": {NAME: float},
            "lens_ce_by_layer": [float, ...]}``; written key for key.
    """
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_jsonable(row), allow_nan=False, ensure_ascii=False) + "\n")


def write_results_json(path: str | Path, results: dict[str, Any]) -> None:
    """Write the results dictionary (see :func:`build_results`) as indented JSON.

    Args:
        path: output file.
        results: the results; NaN becomes ``null``.
    """
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False, ensure_ascii=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- results


def _estimator_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Estimator names found in ``rows[*]["scores"]``, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("scores", {})))
    return list(names)


def _errors(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """(n,) 0/1 array, 1 = incorrect completion."""
    return np.array([not row["correct"] for row in rows], dtype=np.int64)


def _score_column(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray:
    """(n,) scores of one estimator; NaN where the item has none (missing or null)."""
    values = [row.get("scores", {}).get(name) for row in rows]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _float(x: Any) -> float:
    """``x`` as a float, NaN for None (JSON null)."""
    return float("nan") if x is None else float(x)


def _estimator_entry(
    scores: np.ndarray, errors: np.ndarray, cost: dict[str, float], n_boot: int, seed: int
) -> dict[str, Any]:
    """Metrics, cost and item count of one estimator, NaN-scored items dropped."""
    scores, errors = metrics.scored(scores, errors)
    entry = metrics.summarize(scores, errors, n_boot=n_boot, seed=seed)
    entry["cost_forward_equiv"] = _float(cost.get("cost_forward_equiv"))
    entry["seconds"] = _float(cost.get("seconds"))
    entry["n"] = int(scores.size)
    return entry


def _paired_entry(
    scores: np.ndarray, reference: np.ndarray, errors: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """Paired-bootstrap AUROC difference (estimator - reference) on items both scored."""
    keep = ~np.isnan(scores) & ~np.isnan(reference)
    paired = metrics.paired_bootstrap(
        metrics.auroc, scores[keep], reference[keep], errors[keep], n_boot=n_boot, seed=seed
    )
    return {"delta_auroc": paired["delta"], "ci": paired["ci"], "p_value": paired["p_value"]}


def build_results(
    model: str,
    rows: list[dict[str, Any]],
    costs: dict[str, dict[str, float]],
    n_boot: int = 1000,
    seed: int = 0,
    reference: str | Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    random_weights: bool = False,
) -> dict[str, Any]:
    """Compute every estimator's metrics and its AUROC difference to the reference.

    Args:
        model: model name for the report (``Backbone.label``: it says "random weights" where they are).
        rows: items as in scores.jsonl (``correct`` and ``scores`` are used).
        costs: ``{NAME: {"cost_forward_equiv": float, "seconds": float}}``;
            estimators missing here get NaN costs.
        n_boot: bootstrap resamples for the confidence intervals.
        seed: bootstrap seed.
        reference: estimator that the others are compared with (paired bootstrap); given
            several, the one of them with the highest AUROC here (the best baseline); None:
            the best of the registry's references (``registry.reference_of``).
        extra: more top-level keys to add (e.g. the latent model's accuracy).
        random_weights: the base model's weights are random (``random:NAME``): the results say so
            (``"random_weights": true``) and that the accuracy is not a result
            (``"accuracy_is_a_result": false``); the reports write it in place of the accuracy.

    Returns:
        ``{"model", "n", "accuracy", "reference", "estimators": {NAME: {"auroc",
        "auroc_ci", "auprc", "prr", "aurc", "cost_forward_equiv", "seconds",
        "n"}}, "paired_vs_reference": {NAME: {"delta_auroc", "ci", "p_value"}},
        **extra}``. Items with a NaN score are dropped for that estimator only
        (its ``n`` says how many remain). ``paired_vs_reference`` leaves out the
        reference itself and is empty when no item has a reference score.
    """
    errors = _errors(rows)
    scores = {name: _score_column(rows, name) for name in _estimator_names(rows)}
    estimators = {
        name: _estimator_entry(column, errors, costs.get(name, {}), n_boot, seed)
        for name, column in scores.items()
    }
    if not isinstance(reference, str):
        reference = registry.reference_of({name: entry["auroc"] for name, entry in estimators.items()}, reference)
    paired = {}
    if reference in scores:
        paired = {
            name: _paired_entry(column, scores[reference], errors, n_boot, seed)
            for name, column in scores.items()
            if name != reference
        }
    results: dict[str, Any] = {
        "model": model,
        "n": len(rows),
        "accuracy": float(1 - errors.mean()) if len(rows) else float("nan"),
        "reference": reference,
        "estimators": estimators,
        "paired_vs_reference": paired,
    }
    if random_weights:
        results.update(random_weights=True, accuracy_is_a_result=False)
    results.update(extra or {})
    return results


def random_weights_sentence(results: dict[str, Any]) -> str | None:
    """What a report says of a run on random weights in place of its accuracy; None for trained weights."""
    if not results.get("random_weights"):
        return None
    return (
        f"**The base model has random weights** ({results.get('model', '?')}): its accuracy "
        f"({_fmt(results.get('accuracy'))}) and every AUROC here measure nothing a model knows and are not "
        "results; the run measures what the harness costs on this architecture."
    )


# --------------------------------------------------------------------------- tables


def _fmt(x: Any, sign: bool = False) -> str:
    """Three decimals, ``n/a`` for None/NaN."""
    x = _float(x)
    if math.isnan(x):
        return "n/a"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _fmt_p(p: Any) -> str:
    """A p-value as ``=0.123``, or ``<0.001`` below what three decimals can show."""
    p = _float(p)
    return "<0.001" if p < 0.001 else f"={_fmt(p)}"


def _by_auroc(results: dict[str, Any]) -> list[str]:
    """Estimator names sorted by AUROC, highest first, undefined AUROC last."""

    def key(name: str) -> float:
        value = _float(results["estimators"][name].get("auroc"))
        return -math.inf if math.isnan(value) else value

    return sorted(results["estimators"], key=key, reverse=True)


def _table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table, as strings."""
    reference = results.get("reference", "lens_ce")
    with_seeds = any("seeds" in m for m in results["estimators"].values())
    header = [
        "estimator",
        "n",
        "AUROC [95% CI]",
        *(["AUROC over seeds, mean ± sd"] if with_seeds else []),
        "AUPRC",
        "PRR",
        "AURC",
        "cost (fwd-equiv)",
        "seconds",
        f"Δ AUROC vs {reference} [95% CI]",
    ]
    body = []
    for name in _by_auroc(results):
        m = results["estimators"][name]
        lo, hi = m.get("auroc_ci") or (None, None)
        paired = results.get("paired_vs_reference", {}).get(name)
        delta = "—"
        if paired is not None:
            d_lo, d_hi = paired["ci"]
            delta = (
                f"{_fmt(paired['delta_auroc'], sign=True)} [{_fmt(d_lo, sign=True)}, {_fmt(d_hi, sign=True)}]"
                f" p{_fmt_p(paired['p_value'])}"
            )
            if "seeds" in paired and len(paired["seeds"]["delta"]) > 1:
                delta += f"; seeds {_fmt(paired['seeds']['mean'], sign=True)} ± {_fmt(paired['seeds']['sd'])}"
        seeds = m.get("seeds")
        spread = []
        if with_seeds:
            spread = [
                "—" if not seeds else f"{_fmt(seeds['mean'])} ± {_fmt(seeds['sd'])} ({len(seeds['auroc'])})"
            ]
        body.append(
            [
                name,
                str(m.get("n", results.get("n", ""))),
                f"{_fmt(m.get('auroc'))} [{_fmt(lo)}, {_fmt(hi)}]",
                *spread,
                _fmt(m.get("auprc")),
                _fmt(m.get("prr")),
                _fmt(m.get("aurc")),
                _fmt(m.get("cost_forward_equiv")),
                _fmt(m.get("seconds")),
                delta,
            ]
        )
    return header, body


def format_table(results: dict[str, Any]) -> str:
    """The summary table as aligned plain text, for a terminal.

    Args:
        results: as returned by :func:`build_results` (or read back from JSON).

    Returns:
        The table, one line per estimator sorted by AUROC, no trailing newline.
    """
    header, body = _table(results)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _markdown_table(results: dict[str, Any]) -> str:
    """The summary table in GitHub markdown, numbers right-aligned."""
    header, body = _table(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


_HOW_TO_READ = """\
## How to read this

Each estimator scores every item; higher means "more likely wrong". An item is
an error when the model's completion is not the idiom's last word.
**AUROC** is the probability that a random incorrect item scores higher than a
random correct one: 0.5 is chance, 1 is perfect; the interval is a percentile
bootstrap over items. **AUPRC** (average precision) of a random score equals
the base error rate ({error_rate}); higher is better. **PRR** (the
prediction-rejection ratio) is the share of the oracle's gain over random
rejection that the score achieves: 1 perfect, 0 random, negative worse than
random. **AURC** is the mean error rate of the kept items as items are
rejected, most uncertain first; lower is better (a random score gets the error
rate). **Cost** is in forward-pass equivalents of the base model. **Δ AUROC**
is the estimator's AUROC minus the reference's on the same items, with a
paired-bootstrap interval and two-sided p-value; an interval that excludes 0
is a difference beyond resampling noise (not corrected for the number of
estimators compared).
"""


def _seen_sentence(results: dict[str, Any]) -> str | None:
    """What the report says about idioms the checkpoint's latent was trained on (None: no checkpoint)."""
    if not results.get("ckpt"):
        return None
    seen = results.get("seen")
    if seen is None:
        return "The checkpoint does not record its training idioms: items it was trained on could not be left out."
    if results.get("keep_seen"):
        return (
            f"{seen} of these items have idioms the latent was trained on and are included (`--keep_seen`): "
            "their latent scores are in-sample."
        )
    if not seen:
        return "None of the evaluated idioms was in the latent's training data."
    return f"{seen} items whose idiom the latent was trained on were left out (`--keep_seen` keeps them)."


def write_report_md(path: str | Path, results: dict[str, Any], plots: list[str]) -> None:
    """Write a human-readable markdown report.

    Args:
        path: output file (plots are linked relative to its folder).
        results: as returned by :func:`build_results` (or read back from JSON).
        plots: plot file names, as returned by :func:`plot_all`.
    """
    accuracy = _float(results.get("accuracy"))
    n = results.get("n", 0)
    parts = [
        f"# Which signal says a completion is wrong? — {results.get('model', '?')}",
        random_weights_sentence(results)
        or f"**{n} items**, accuracy **{_fmt(accuracy)}** (base error rate {_fmt(1 - accuracy)}).",
        _markdown_table(results),
    ]
    seen = _seen_sentence(results)
    if seen:
        parts.insert(2, seen)
    partial = {name: m["n"] for name, m in results["estimators"].items() if m.get("n", n) != n}
    if partial:
        listed = ", ".join(f"`{name}` (n={k})" for name, k in partial.items())
        parts.append(f"Scored on fewer items (undefined scores dropped): {listed}.")
    for name in registry.fitted(list(results["estimators"])):
        fit = results.get(f"{registry.family_of(name).name}_fit")
        if fit:
            parts.append(
                f"The {name} was fitted on {fit['n']} items of {fit['source']}: none of them is evaluated here, "
                "and the learned features are out-of-sample on them as on the evaluated items."
            )
    parts.append(_what_the_numbers_are())
    parts.append(_HOW_TO_READ.format(error_rate=_fmt(1 - accuracy)).rstrip())
    if plots:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{_PLOT_TITLES.get(p, p)}]({p})" for p in plots))
    Path(path).write_text("\n\n".join(parts) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- plots


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
}
_PLOT_TITLES = {
    "roc.png": "ROC curves",
    "lens_by_layer.png": "Lens cross-entropy by layer, correct vs incorrect",
    "histograms.png": "Score histograms",
    "risk_coverage.png": "Risk-coverage curves",
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


# --------------------------------------------------------------------------- cross-fitted runs


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


_PLOT_TITLES["auroc_forest.png"] = "AUROC by estimator: bootstrap interval and each seed"

def _and(parts: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)


def _bullet(text: str) -> str:
    return textwrap.fill(text, width=96, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)


def _what_the_numbers_are() -> str:
    """What the numbers are, each estimator named as its family's ``prose`` says (``registry.FAMILIES``)."""
    families = registry.FAMILIES
    references = [f.words("reference") for f in families if f.reference]
    single = [f.words("cost") for f in families if f.reads_forward and not f.extra_passes and f.fit is None]
    passes = [f.words("cost") for f in families if f.extra_passes]
    fitted = ""
    for family in (f for f in families if f.fit is not None):
        passes_of_its_own = any(registry.family_of(registry.writer_of(key)).extra_passes for key in family.features)
        what = "what its features cost" if passes_of_its_own else "the shared forward"
        fitted += f"; {family.words('cost')} is {what} plus its fit"
    bullets = [
        "**`lens_ce` at the last layer is −log p(ŷ)** and ranks items as `msp` (1 − p(ŷ)) does, up to float32 "
        "rounding of −log p near 0: under greedy decoding the paper's output cross-entropy is the max-probability "
        "baseline. The lens adds information only through the intermediate layers (`lens_area`, the by-layer curve).",
        f"**The reference** is the best cheap baseline: of {_and(references)}, the one with the highest AUROC "
        "(mean over seeds in a cross-fitted run). This choice looks at the scored items, which only raises the bar "
        "for the others.",
        f"**Cost** is in plain forwards over the same items. The single-pass estimators ({', '.join(single)}) share "
        "one forward, and each is charged that whole forward with every read off it; "
        f"{_and(passes)} are charged it plus their own passes{fitted}. Training the latents is not in the cost.",
    ]
    return "## What the numbers are\n\n" + "\n".join(_bullet(b) for b in bullets)


def write_crossval_md(path: str | Path, results: dict[str, Any], plots: list[str]) -> None:
    """The report of a cross-fitted run: protocol, table with seed spreads, how to read it, plots."""
    proto = results.get("protocol", {})
    accuracy = _float(results.get("accuracy"))
    n = results.get("n", 0)
    seeds = proto.get("seeds", [])
    latent = ", ".join(f"{k}={v}" for k, v in (proto.get("latent") or {}).items())
    extra = ""
    if proto.get("extra_train"):
        who = "Every fold also trains" if (proto.get("folds") or 0) > 1 else "The latent trains"
        extra = f" {who} on {proto.get('n_extra_train')} idioms of `{proto['extra_train']}` (none of them scored"
        if proto.get("n_extra_dropped"):
            extra += f"; {proto['n_extra_dropped']} more were left out as scored idioms or variants of one"
        extra += ")."
    if proto.get("self_targets"):
        extra += (
            " Each latent also trained on the base model's own completion word as a second target of every "
            "training prompt it completes wrongly (`--self_targets`)."
        )
    if proto.get("from_checkpoints"):
        extra += (
            f" The latents were loaded from `{proto['from_checkpoints']}` (each checked to have trained on its "
            "fold's training idioms exactly), not retrained."
        )
    folds = proto.get("folds")
    how = (
        f"{folds} folds (idioms dealt by a hash seeded with {proto.get('fold_seed')}): each fold's latent trained on "
        "the other folds and scored its own, so every score is out-of-fold"
        if folds and folds > 1
        else "One latent per seed, trained on the extra idioms only, scores every item"
    )
    random = random_weights_sentence(results)
    parts = [
        f"# Cross-fitted comparison — {results.get('model', '?')}",
        *([random] if random else []),
        f"**{n} idioms** of `{proto.get('data')}`, accuracy **{_fmt(accuracy)}** (base error rate "
        f"{_fmt(1 - accuracy)}). {how}.{extra} Seeds {', '.join(map(str, seeds))} (training, z draws, dropout "
        f"masks, sampled completions); {proto.get('epochs')} epochs per latent; latent from "
        f"`{proto.get('training_config')}` ({latent}). The settings are the config's, fixed before this run; "
        "nothing here was chosen on these scores.",
        f"Reference: **`{results.get('reference')}`** (the best cheap baseline). The table's interval is a "
        "bootstrap over items for the first seed; the next column is the mean ± sd of AUROC over seeds "
        "(number of seeds); Δ is paired against the reference on the same items, first seed, then the mean ± sd "
        "of Δ over seeds.",
        _markdown_table(results),
    ]
    dropped = results.get("dropped") or {}
    if dropped:
        parts.append("Not run: " + "; ".join(f"`{k}` ({v})" for k, v in dropped.items()) + ".")
    training = results.get("fold_training") or []
    if training:
        kl = [t["kl"] for t in training if "kl" in t]
        active = [t["active_units"] for t in training if "active_units" in t]
        secs = sum(t["train_seconds"] for t in training)
        if kl:
            parts.append(
                f"The {len(training)} latents: training KL {min(kl):.2f}–{max(kl):.2f} nats/item, "
                f"{min(active):.0f}–{max(active):.0f} active units, {secs / 60:.1f} min of training in all."
            )
    total = results.get("seconds_total")
    if total:
        parts.append(f"The whole run took {total / 60:.1f} min.")
    parts.append(_what_the_numbers_are())
    parts.append(_HOW_TO_READ.format(error_rate=_fmt(1 - accuracy)).rstrip())
    if plots:
        parts.append(
            "## Plots\n\n"
            + "\n\n".join(f"![{_PLOT_TITLES.get(Path(p).name, p)}]({p})" for p in plots)
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n\n".join(parts) + "\n", encoding="utf-8")
