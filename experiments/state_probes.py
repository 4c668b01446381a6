"""The state probes cross-fitted on a committed cross-fitted run: its items, folds, labels and seeds.

``state_probe``, ``state_probe_latent`` and ``se_probe`` read the residual state at the scored
position (``vtrans.estimators.states``), which a run never writes: this computes it again with
one forward per item of the run's base model (its prompts and completions from
``units/base.json``), then fits each family exactly as ``vtrans crossval`` does
(``vtrans.evaluation.fitted.cross_fitted``: fold f's fit is on the other folds' rows), seed by
seed, with that seed's ``adapter_nll`` (``state_probe_latent``) and ``sample_word_entropy``
(``se_probe``'s target). Every setting of the three fits is fixed in their modules or chosen on
inner folds of the training folds; nothing here is chosen on the scored rows.

AUROC is the mean over the run's seeds. Each Δ is a paired bootstrap over items of that mean
(the same resampled items for both estimators), with its raw 95% interval and the interval
Bonferroni-corrected over every comparison in the table.

    python experiments/state_probes.py docs/crossval --out docs/verdict/state-probes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vtrans.backbone.generate import Completion
from vtrans.backbone.loading import Backbone
from vtrans.config import EstimatorConfig
from vtrans.estimators import se_probe, state_probe
from vtrans.estimators.runner import Runner
from vtrans.evaluation import metrics
from vtrans.evaluation.fitted import cross_fitted

FITTED = (state_probe.FAMILY, state_probe.WITH_LATENT, se_probe.FAMILY)
RECORDED = ("msp", "sample_word_entropy", "probe", "adapter_nll")
# (estimator, against): every Δ the table reports, the family of the Bonferroni correction
COMPARISONS = (
    ("state_probe", "msp"),
    ("state_probe_latent", "msp"),
    ("se_probe", "msp"),
    ("se_probe", "sample_word_entropy"),
    ("state_probe", "probe"),
    ("state_probe", "adapter_nll"),
    ("state_probe_latent", "adapter_nll"),
)


def seed_columns(rows: list[dict], name: str) -> list[np.ndarray]:
    """One (n,) column per seed of a recorded score (the row's ``scores`` are the first seed's)."""
    per_row = [[r["scores"], *(r.get("scores_by_seed") or {}).values()] for r in rows]
    return [np.array([by[s][name] for by in per_row], dtype=float) for s in range(len(per_row[0]))]


def residual_states(run: Path, results: dict, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """(n, depths, C): the states of the run's items, and their prompts, in ``units/base.json``'s order."""
    base = json.loads((run / "units" / "base.json").read_text())["record"]
    backbone = Backbone(**results["protocol"]["backbone"])
    completions = [Completion(**{**c, "word_ids": tuple(c["word_ids"])}) for c in base["completions"]]
    runner = Runner(backbone, None, EstimatorConfig(batch_size=batch_size), progress=True)
    return runner.scores(base["prompts"], completions, ["residual_states"])["residual_states"], base["prompts"]


def cross_fit_all(
    states: torch.Tensor, cols: dict[str, list[np.ndarray]], recorded: tuple[str, ...], correct: list[bool],
    folds: list[int], k: int,
) -> dict[str, list[np.ndarray]]:
    """Each of :data:`FITTED`'s scores, one column per seed, cross-fitted over ``folds`` (``k`` of
    them) with that seed's ``recorded`` columns; a family that reads none of them is fitted once."""
    out: dict[str, list[np.ndarray]] = {}
    started = time.perf_counter()
    for family in FITTED:
        by_seed = any(key in recorded for key in (*family.fitted.features, *family.fitted.targets))
        out[family.name] = []
        for s in range(len(cols["msp"])):
            if not by_seed and s:  # reads the seed-free states only: the same fit for every seed
                out[family.name].append(out[family.name][0])
                continue
            features = {"residual_states": states, **{n: torch.tensor(cols[n][s], dtype=torch.float32) for n in recorded}}
            out[family.name].append(cross_fitted(family, features, correct, folds, k).numpy().astype(float))
            print(f"{family.name}, seed {s}: fitted ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a vtrans crossval output folder (scores.jsonl, results.json, units/)")
    parser.add_argument("--out", type=Path, help="write results.json and table.md here")
    parser.add_argument("--n_boot", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run / "scores.jsonl").read_text().splitlines()]
    results = json.loads((args.run / "results.json").read_text())
    k = results["protocol"]["folds"]
    started = time.perf_counter()
    states, prompts = residual_states(args.run, results, args.batch_size)
    forward_s = time.perf_counter() - started
    by_prompt = {p: i for i, p in enumerate(prompts)}
    order = [by_prompt[r["prompt"]] for r in rows]  # the rows' order, checked prompt by prompt
    states = states[order]
    correct, folds = [r["correct"] for r in rows], [r["fold"] for r in rows]
    errors = np.array([not c for c in correct], dtype=float)
    cols = {name: seed_columns(rows, name) for name in RECORDED}
    started = time.perf_counter()
    cols.update(cross_fit_all(states, cols, RECORDED, correct, folds, k))
    fit_s = time.perf_counter() - started

    names = [*RECORDED, *(f.name for f in FITTED)]

    def mean_auroc(name: str) -> float:
        return float(np.mean([metrics.auroc(c, errors) for c in cols[name]]))

    # the same resamples (generator seed 0) for every column: each row pairs every estimator
    boot = {
        name: np.mean([metrics.resampled_values(metrics.auroc, c, errors, args.n_boot, seed=0) for c in cols[name]], axis=0)
        for name in names
    }
    m = len(COMPARISONS)
    estimators = {
        name: {"auroc": mean_auroc(name), "by_seed": [metrics.auroc(c, errors) for c in cols[name]],
               "ci": [float(v) for v in np.nanpercentile(boot[name], [2.5, 97.5])]}
        for name in names
    }
    deltas = []
    for name, against in COMPARISONS:
        d = boot[name] - boot[against]
        deltas.append({
            "estimator": name, "against": against, "delta": mean_auroc(name) - mean_auroc(against),
            "ci": [float(v) for v in np.nanpercentile(d, [2.5, 97.5])],
            "corrected_ci": [float(v) for v in np.nanpercentile(d, [100 * 0.025 / m, 100 * (1 - 0.025 / m)])],
        })
    out = {
        "run": str(args.run), "n": len(rows), "n_wrong": int(errors.sum()), "seeds": results["protocol"]["seeds"],
        "folds": k, "n_boot": args.n_boot, "correction": f"Bonferroni over {m} comparisons",
        "estimators": estimators, "deltas": deltas,
        "seconds": {"states_forward": forward_s, "fits": fit_s},
        "computed_with": [{"threads": torch.get_num_threads(), "torch": torch.__version__}],
    }
    lines = [
        f"{args.run}: n = {len(rows)} ({int(errors.sum())} wrong), seeds {results['protocol']['seeds']}, "
        f"{k} folds by idiom; {args.n_boot} paired bootstrap draws; Bonferroni over {m} comparisons.",
        "",
        "| estimator | AUROC (mean over seeds) [95% CI] | per seed |",
        "|---|---:|---|",
        *(f"| `{n}` | {e['auroc']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}] | "
          + ", ".join(f"{a:.3f}" for a in e["by_seed"]) + " |" for n, e in estimators.items()),
        "",
        "| Δ AUROC | estimate | raw 95% CI | corrected CI |",
        "|---|---:|---|---|",
        *(f"| `{d['estimator']}` − `{d['against']}` | {d['delta']:+.3f} | [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] | "
          f"[{d['corrected_ci'][0]:+.3f}, {d['corrected_ci'][1]:+.3f}] |" for d in deltas),
        "",
        f"States: one forward of {len(rows)} items in {forward_s:.0f} s; the {len(FITTED)} families' fits, "
        f"{len(cols['msp'])} seeds × {k} folds, in {fit_s:.0f} s ({torch.get_num_threads()} threads).",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(out, indent=1) + "\n")
        (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
