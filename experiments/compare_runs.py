"""Compare cross-fitted runs on the same items, and ask what an estimator adds beyond another.

Two uses, both reading the ``scores.jsonl`` of ``vtrans crossval`` runs:

* ``--against RUN``: every estimator present in both runs, AUROC in each and the paired
  bootstrap Δ (this run minus ``RUN``) on the same items; the items must match, labels included.
* ``--strata NAME``: each estimator's AUROC within the terciles of ``NAME``'s score (low,
  middle, high), next to ``NAME``'s own. An estimator that only re-expresses ``NAME`` ranks
  errors within its terciles no better than ``NAME`` does.

    python experiments/compare_runs.py docs/ideas/wordnet --against docs/crossval
    python experiments/compare_runs.py docs/crossval --strata msp
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vtrans.evaluation import metrics


def read_run(run: str | Path, seed: str | None = None) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(idioms, errors, {estimator: scores}) of a run, for its first seed or the one named."""
    rows = [json.loads(line) for line in (Path(run) / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    idioms = [r["idiom"] for r in rows]
    errors = np.array([0.0 if r["correct"] else 1.0 for r in rows])
    def of(r):
        return r["scores"] if seed is None or seed not in r.get("scores_by_seed", {}) else r["scores_by_seed"][seed]

    names = list(of(rows[0]))
    return idioms, errors, {nm: np.array([of(r)[nm] for r in rows], dtype=float) for nm in names}


def against(run: str, other: str, seed: str | None, n_boot: int) -> list[str]:
    idioms, errors, scores = read_run(run, seed)
    idioms_o, errors_o, scores_o = read_run(other, seed)
    if idioms != idioms_o or not np.array_equal(errors, errors_o):
        raise SystemExit(f"error: {run} and {other} do not score the same items with the same labels")
    lines = [
        f"{len(errors)} items; Δ = {Path(run).name} − {Path(other).name}, paired bootstrap ({n_boot} resamples)",
        "",
        f"| estimator | AUROC {Path(other).name} | AUROC {Path(run).name} | Δ [95% CI] |",
        "|---|---:|---:|---:|",
    ]
    for nm in scores:
        if nm not in scores_o:
            continue
        paired = metrics.paired_bootstrap(metrics.auroc, scores[nm], scores_o[nm], errors, n_boot=n_boot)
        lo, hi = paired["ci"]
        lines.append(
            f"| `{nm}` | {metrics.auroc(scores_o[nm], errors):.3f} | {metrics.auroc(scores[nm], errors):.3f} | "
            f"{paired['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] p={paired['p_value']:.3f} |"
        )
    return lines


def strata(run: str, by: str, seed: str | None) -> list[str]:
    _, errors, scores = read_run(run, seed)
    if by not in scores:
        raise SystemExit(f"error: {run} has no estimator {by!r}")
    edges = np.quantile(scores[by], [1 / 3, 2 / 3])
    tercile = np.digitize(scores[by], edges)
    head = " | ".join(
        f"{label} (n={int((tercile == t).sum())}, error rate {errors[tercile == t].mean():.2f})"
        for t, label in enumerate(("low", "middle", "high"))
    )
    lines = [f"AUROC within the terciles of `{by}`", "", f"| estimator | {head} |", "|---|---:|---:|---:|"]
    for nm, values in scores.items():
        cells = [f"{metrics.auroc(values[tercile == t], errors[tercile == t]):.3f}" for t in range(3)]
        lines.append(f"| `{nm}` | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a vtrans crossval output folder")
    parser.add_argument("--against", default=None, help="another run's folder: paired Δ per shared estimator")
    parser.add_argument("--strata", default=None, help="an estimator: AUROC of every estimator within its terciles")
    parser.add_argument("--seed", default=None, help="a seed of the run other than its first (default: the first)")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)
    if not (args.against or args.strata):
        parser.error("give --against RUN or --strata NAME")
    if args.against:
        print("\n".join(against(args.run, args.against, args.seed, args.n_boot)))
    if args.strata:
        print("\n".join(strata(args.run, args.strata, args.seed)))


if __name__ == "__main__":
    main()
