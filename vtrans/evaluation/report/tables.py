"""The summary table of a run's results: one row per estimator, sorted by AUROC, as plain text or markdown."""

from __future__ import annotations

import math
from typing import Any

from vtrans.evaluation.report.results import _float


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
    correction = results.get("correction")  # absent from results written before it was recorded
    header = [
        "estimator",
        "n",
        "AUROC [95% CI]",
        *(["AUROC over seeds, mean ± sd"] if with_seeds else []),
        "AUPRC",
        "PRR",
        "AURC",
        "ECE",
        "Brier",
        "cost (fwd-equiv)",
        "seconds",
        f"Δ AUROC vs {reference} [95% CI]",
        *([f"corrected CI (Bonferroni, {correction['comparisons']})"] if correction else []),
    ]
    body = []
    for name in _by_auroc(results):
        m = results["estimators"][name]
        lo, hi = m.get("auroc_ci") or (None, None)
        paired = results.get("paired_vs_reference", {}).get(name)
        delta = corrected = "—"
        if paired is not None:
            d_lo, d_hi = paired["ci"]
            delta = (
                f"{_fmt(paired['delta_auroc'], sign=True)} [{_fmt(d_lo, sign=True)}, {_fmt(d_hi, sign=True)}]"
                f" p{_fmt_p(paired['p_value'])}"
            )
            if "corrected_ci" in paired:
                c_lo, c_hi = paired["corrected_ci"]
                corrected = f"[{_fmt(c_lo, sign=True)}, {_fmt(c_hi, sign=True)}]"
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
                _fmt(m.get("ece")),
                _fmt(m.get("brier")),
                _fmt(m.get("cost_forward_equiv")),
                _fmt(m.get("seconds")),
                delta,
                *([corrected] if correction else []),
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
