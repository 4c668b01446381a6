"""CoCoA recomputed from a cross-fitted run's committed scores, against ``msp`` and the sampled-word agreement.

``cocoa`` = −log p(ŷ) × ``sample_disagreement`` (``vtrans.estimators.sampling``); with the
default ``--aggregate first``, p(ŷ) = 1 − ``msp``, so a run that scored ``msp`` and
``sample_disagreement`` gives it item by item, seed by seed, with no new pass. AUROC is the mean
over the run's seeds; Δ is the paired bootstrap of that mean against ``msp`` on the same items,
with its raw 95% interval and the interval Bonferroni-corrected over the estimators compared.

    python experiments/cocoa.py docs/crossval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vtrans.evaluation import metrics

NAMES = ("msp", "sample_disagreement", "sample_word_entropy", "cocoa")


def columns(rows: list[dict], name: str) -> list[np.ndarray]:
    """One (n,) column per seed (the row's ``scores`` are the first seed's)."""
    seeds = [row_seeds(r) for r in rows]
    out = []
    for s in range(len(seeds[0])):
        per = [by[s] for by in seeds]
        if name == "cocoa":
            out.append(np.array([-np.log1p(-p["msp"]) * p["sample_disagreement"] for p in per]))
        else:
            out.append(np.array([p[name] for p in per]))
    return out


def row_seeds(row: dict) -> list[dict]:
    return [row["scores"], *(row.get("scores_by_seed") or {}).values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a vtrans crossval output folder (its scores.jsonl)")
    parser.add_argument("--n_boot", type=int, default=2000)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run / "scores.jsonl").read_text().splitlines()]
    errors = np.array([not r["correct"] for r in rows], dtype=float)
    cols = {name: columns(rows, name) for name in NAMES}
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(rows), len(rows)) for _ in range(args.n_boot)]

    def mean_auroc(name: str, ix: np.ndarray | slice = slice(None)) -> float:
        return float(np.mean([metrics.auroc(c[ix], errors[ix]) for c in cols[name]]))

    boot = {name: np.array([mean_auroc(name, ix) for ix in draws]) for name in NAMES}
    m = len(NAMES) - 1
    print(f"{args.run}: n = {len(rows)} ({int(errors.sum())} wrong), {len(cols['msp'])} seed(s); Bonferroni over {m}")
    print("| estimator | AUROC (mean over seeds) | per seed | Δ vs msp [95% CI] | Bonferroni-corrected CI |")
    print("|---|---:|---|---|---|")
    for name in NAMES:
        per = ", ".join(f"{metrics.auroc(c, errors):.3f}" for c in cols[name])
        delta = boot[name] - boot["msp"]
        lo, hi = np.percentile(delta, [2.5, 97.5])
        clo, chi = np.percentile(delta, [100 * 0.025 / m, 100 * (1 - 0.025 / m)])
        d = mean_auroc(name) - mean_auroc("msp")
        print(f"| `{name}` | {mean_auroc(name):.3f} | {per} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | [{clo:+.3f}, {chi:+.3f}] |")


if __name__ == "__main__":
    main()
