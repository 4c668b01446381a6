"""The confirmatory analysis, as ``docs/confirm/preregistration.md`` fixes it: AUROCs, the nine
comparisons with raw and Bonferroni-corrected intervals, and a verdict per hypothesis.

Reads the two runs the preregistration names (``latent`` and ``twin``, each a ``vtrans crossval
--folds 1`` output), cross-fits ``state_probe``, ``state_probe_latent`` and ``se_probe`` over 5
folds of the scored items by idiom (``assign_folds(items, 5, seed=0)``), and writes
``results.json`` and ``report.md`` beside them.

    python experiments/confirm.py docs/confirm
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from state_probes import cross_fit_all, residual_states, seed_columns

from vtrans.data import load_idioms
from vtrans.data.items import idiom_key
from vtrans.estimators.registry import reference_of
from vtrans.evaluation import metrics
from vtrans.evaluation.folds import assign_folds

CHEAP = ("msp", "entropy", "margin", "sample_disagreement", "sample_word_entropy")
RECORDED = (*CHEAP, "cocoa", "posterior_var", "latent_kl", "latent_mi", "latent_nll", "adapter_nll")
TWIN = "adapter_nll (twin)"
FOLDS, MARGIN, LEVEL = 5, 0.02, 0.05
# the preregistration's m: its sum of the comparisons below reads 9 where they are 10; both are reported
STATED_M = 9
# name, [(estimator, against)], the side a support needs ("above": corrected CI > 0; "either": excludes 0;
# "within": inside ±MARGIN); "B" is the best cheap baseline
HYPOTHESES = (
    ("H1: the latent's prediction beats the best cheap baseline", [("adapter_nll", "B")], "above"),
    ("H2: the variational latent and its twin are equivalent", [("adapter_nll", TWIN)], "within"),
    ("H3: the best spread beats msp", [("posterior_var", "msp"), ("latent_kl", "msp"), ("latent_mi", "msp")], "above"),
    ("H4: the hidden-state probe and the latent's prediction differ", [("state_probe", "adapter_nll")], "either"),
    ("H5: the hidden-state probe beats the best cheap baseline", [("state_probe", "B")], "above"),
    ("H6: the latent adds to the hidden-state probe", [("state_probe_latent", "state_probe")], "above"),
    ("H7: the semantic-entropy probe beats the entropy it was trained to predict", [("se_probe", "sample_word_entropy")], "above"),
    ("H8: latent_nll beats the best cheap baseline", [("latent_nll", "B")], "above"),
)


def read_run(run: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    return rows, json.loads((run / "results.json").read_text())


def verdict(side: str, cis: list[list[float]]) -> str:
    if side == "within":
        return "equivalent" if all(-MARGIN < lo and hi < MARGIN for lo, hi in cis) else "not supported"
    if side == "either":
        return "supported" if any(lo > 0 or hi < 0 for lo, hi in cis) else "not supported"
    return "supported" if any(lo > 0 for lo, _ in cis) else "not supported"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="holds items.txt and the runs latent/ and twin/")
    parser.add_argument("--n_boot", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    rows, results = read_run(args.folder / "latent")
    twin_rows, twin_results = read_run(args.folder / "twin")
    errors = np.array([not r["correct"] for r in rows], dtype=float)
    twin_by_idiom = {idiom_key(r["idiom"]): r for r in twin_rows}  # one prompt may end several idioms
    if set(twin_by_idiom) != {idiom_key(r["idiom"]) for r in rows} or len(twin_by_idiom) != len(rows):
        raise SystemExit("the latent and twin runs scored different items")
    if any(twin_by_idiom[idiom_key(r["idiom"])]["correct"] != r["correct"] for r in rows):
        raise SystemExit("the latent and twin runs label an item differently")

    items = load_idioms(f"txt:{args.folder / 'items.txt'}")
    fold_of = dict(zip((idiom_key(it.idiom) for it in items), assign_folds(items, FOLDS, seed=0), strict=True))
    folds = [fold_of[idiom_key(r["idiom"])] for r in rows]
    cols = {name: seed_columns(rows, name) for name in RECORDED}
    cols[TWIN] = seed_columns([twin_by_idiom[idiom_key(r["idiom"])] for r in rows], "adapter_nll")

    started = time.perf_counter()
    states, prompts = residual_states(args.folder / "latent", results, args.batch_size)
    states = states[[{p: i for i, p in enumerate(prompts)}[r["prompt"]] for r in rows]]
    correct = [r["correct"] for r in rows]
    cols.update(cross_fit_all(states, cols, RECORDED, correct, folds, FOLDS))
    fit_seconds = time.perf_counter() - started

    def mean_auroc(name: str) -> float:
        return float(np.mean([metrics.auroc(c, errors) for c in cols[name]]))

    boot = {
        name: np.mean([metrics.resampled_values(metrics.auroc, c, errors, args.n_boot, seed=0) for c in columns], axis=0)
        for name, columns in cols.items()
    }
    best = reference_of({name: mean_auroc(name) for name in CHEAP}, CHEAP)
    m = sum(len(pairs) for _, pairs, _ in HYPOTHESES)
    q = [100 * LEVEL / 2, 100 * (1 - LEVEL / 2)]
    qc = [100 * LEVEL / (2 * m), 100 * (1 - LEVEL / (2 * m))]
    q9 = [100 * LEVEL / (2 * STATED_M), 100 * (1 - LEVEL / (2 * STATED_M))]
    hypotheses = []
    for name, pairs, side in HYPOTHESES:
        comparisons = []
        for a, b in pairs:
            b = best if b == "B" else b
            d = boot[a] - boot[b]
            comparisons.append({
                "estimator": a, "against": b, "estimate": mean_auroc(a) - mean_auroc(b),
                "ci": [float(v) for v in np.nanpercentile(d, q)], "corrected_ci": [float(v) for v in np.nanpercentile(d, qc)],
                f"corrected_ci_m{STATED_M}": [float(v) for v in np.nanpercentile(d, q9)],
            })
        hypotheses.append({
            "name": name, "comparisons": comparisons, "verdict": verdict(side, [c["corrected_ci"] for c in comparisons]),
            f"verdict_m{STATED_M}": verdict(side, [c[f"corrected_ci_m{STATED_M}"] for c in comparisons]),
        })
    estimators = {
        name: {"auroc": mean_auroc(name), "ci": [float(v) for v in np.nanpercentile(boot[name], q)],
               "by_seed": [metrics.auroc(c, errors) for c in cols[name]],
               "sd_over_seeds": float(np.std([metrics.auroc(c, errors) for c in cols[name]], ddof=1))}
        for name in cols
    }
    out = {
        "n": len(rows), "n_wrong": int(errors.sum()), "distinct_prompts": len({r["prompt"] for r in rows}), "seeds": results["protocol"]["seeds"], "best_cheap_baseline": best,
        "correction": f"Bonferroni over m = {m} comparisons: level 1 - {LEVEL}/{m}", "margin": MARGIN, "n_boot": args.n_boot,
        "estimators": estimators, "hypotheses": hypotheses, "fit_seconds": fit_seconds,
        "computed_with": {"latent": results.get("computed_with"), "twin": twin_results.get("computed_with"),
                          "analysis": [{"threads": torch.get_num_threads(), "torch": torch.__version__}]},
    }
    (args.folder / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.folder / "report.md").write_text(report(out) + "\n")
    print(report(out))


def report(out: dict) -> str:
    lines = [
        "# The confirmatory run",
        "",
        f"As preregistered in [preregistration.md](preregistration.md): n = {out['n']} WordNet 3.0 expressions "
        f"({out['n_wrong']} completed wrongly), seeds {out['seeds']}, latents trained on the built-in idioms only. "
        f"AUROC is the mean over seeds; intervals are paired percentile bootstraps over items ({out['n_boot']} "
        f"resamples); {out['correction']}. The best cheap baseline on these items is `{out['best_cheap_baseline']}`.",
        "",
        "| hypothesis | comparison | Δ AUROC | raw 95% CI | corrected CI | verdict |",
        "|---|---|---:|---|---|---|",
    ]
    for h in out["hypotheses"]:
        for i, c in enumerate(h["comparisons"]):
            lines.append(
                f"| {h['name'] if i == 0 else ''} | `{c['estimator']}` − `{c['against']}` | {c['estimate']:+.3f} | "
                f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | [{c['corrected_ci'][0]:+.3f}, {c['corrected_ci'][1]:+.3f}] | "
                f"{h['verdict'] if i == 0 else ''} |"
            )
    lines += ["", "| estimator | AUROC [95% CI] | sd over seeds | per seed |", "|---|---:|---:|---|"]
    for name, e in sorted(out["estimators"].items(), key=lambda kv: -kv[1]["auroc"]):
        lines.append(f"| `{name}` | {e['auroc']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}] | {e['sd_over_seeds']:.3f} | "
                     + ", ".join(f"{a:.3f}" for a in e["by_seed"]) + " |")
    same = all(h["verdict"] == h[f"verdict_m{STATED_M}"] for h in out["hypotheses"])
    lines += [
        "",
        "## Deviations and remarks",
        "",
        f"- **m.** The preregistration lists ten comparisons but writes their sum as 9. The intervals above count "
        f"all ten (the more conservative); at m = {STATED_M} the verdicts are "
        + ("the same." if same else "different: " + "; ".join(
            f"{h['name'].split(':')[0]} {h[f'verdict_m{STATED_M}']}" for h in out["hypotheses"]
            if h["verdict"] != h[f"verdict_m{STATED_M}"]) + "."),
        f"- **Shared prompts.** The {out['n']} expressions have {out['distinct_prompts']} distinct prompts: "
        "WordNet holds families such as \"keep one's eyes off\" and \"keep one's eyes open\", whose prompt and "
        "completion are one, so at most one of them is right. The items are therefore not independent, and a "
        "bootstrap over items gives intervals somewhat narrower than a bootstrap over prompts would. The twin is "
        "paired with the latent idiom by idiom, not prompt by prompt.",
        "",
        f"Where it ran: {json.dumps(out['computed_with'])}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
