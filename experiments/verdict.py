"""Does the variational part earn its place? One table and one figure from cross-fitted runs on the same items.

Reads the ``scores.jsonl`` and ``results.json`` of several ``vtrans crossval`` runs over the same
idioms, folds and base-model completions (the labels must match item by item), and writes, for
every estimator (from the first run, in the order given, that has it):

* its AUROC on the first seed with a bootstrap interval over items, and its mean ± sd over seeds;
* the paired Δ AUROC against the reference (``msp``, the best cheap baseline) and against
  ``latent_nll`` (the variational latent's predictive), on the same items and seed, with a
  paired-bootstrap interval, then the mean ± sd of the per-seed Δ;
* its kind: a baseline (no latent), the *mean* of a latent's prediction, a *spread*, or fitted on labels;
* its cost in forwards (the run's own accounting; the latents' training is not in it).

and a figure of the mean-versus-spread story, item by item: each estimator's rank against
``msp``'s, correct and wrong completions apart.

    python experiments/verdict.py --run docs/seeds5/latent --run twin=docs/seeds5/twin \\
        --run docs/verdict/ensemble --run docs/crossval --out docs/verdict
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from vtrans.evaluation import metrics

KIND = {
    "msp": "baseline", "entropy": "baseline", "sample_disagreement": "baseline", "sample_word_entropy": "baseline",
    "cocoa": "baseline",
    "latent_nll": "mean", "adapter_nll": "mean", "ensemble_nll": "mean", "laplace_nll": "mean",
    "posterior_var": "spread", "latent_kl": "spread", "latent_mi": "spread", "ensemble_var": "spread",
    "ensemble_mi": "spread", "laplace_loc_var": "spread", "laplace_var": "spread", "laplace_mi": "spread",
    "refit_prior_var": "spread", "refit_var": "spread", "refit_mi": "spread", "refit_nll": "mean",
    "lens_ce": "baseline", "lens_area": "baseline", "attention_entropy": "baseline", "mc_dropout_var": "baseline",
    "mc_dropout_entropy": "baseline", "mc_dropout_mi": "baseline", "margin": "baseline", "probe": "fitted",
    "probe_latent": "fitted", "state_probe": "fitted", "state_probe_latent": "fitted", "se_probe": "fitted",
}
FIGURE = ("latent_nll", "adapter_nll (twin)", "ensemble_nll", "posterior_var", "latent_mi", "laplace_var",
          "ensemble_var", "ensemble_mi")


class Run:
    """One crossval run: its items, labels, scores by seed and results."""

    def __init__(self, spec: str) -> None:
        tag, _, folder = spec.rpartition("=")
        self.folder, self.tag = Path(folder), tag  # TAG=FOLDER: its estimators read "name (TAG)", kept apart
        rows = [json.loads(line) for line in (self.folder / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
        self.results = json.loads((self.folder / "results.json").read_text(encoding="utf-8"))
        self.idioms = [r["idiom"] for r in rows]
        self.errors = np.array([0.0 if r["correct"] else 1.0 for r in rows])
        self.seeds = [str(s) for s in self.results["protocol"]["seeds"]]
        first = self.seeds[0]
        self.scores = {first: {self.label(nm): np.array([r["scores"][nm] for r in rows]) for nm in rows[0]["scores"]}}
        for seed in self.seeds[1:]:
            self.scores[seed] = {
                self.label(nm): np.array([r["scores_by_seed"][seed][nm] for r in rows]) for nm in rows[0]["scores"]
            }
        self.costs = {self.label(nm): v["cost_forward_equiv"] for nm, v in self.results["estimators"].items()}

    def label(self, name: str) -> str:
        """How the table names an estimator of this run: the seed-free baselines as they are, the others
        with the run's tag."""
        return name if not self.tag or KIND.get(name) == "baseline" else f"{name} ({self.tag})"

    @property
    def names(self) -> list[str]:
        return list(self.scores[self.seeds[0]])

    def cost(self, name: str) -> float:
        return self.costs[name]


def find(runs: list[Run], name: str) -> Run | None:
    """The first run (in the order given) that has ``name``: the one the table reads it from."""
    return next((r for r in runs if name in r.names), None)


def paired(run: Run, name: str, other: Run, against: str, n_boot: int, compared: int = 1) -> dict | None:
    """Δ AUROC of ``name`` minus ``against`` on the first seed (paired bootstrap, with the interval
    Bonferroni-corrected over ``compared`` comparisons beside the raw one) and over the seeds both have."""
    if other is None or (run is other and name == against):
        return None
    seeds = [s for s in run.seeds if s in other.seeds]
    if not seeds:
        return None
    s0 = seeds[0]
    both = (metrics.auroc, run.scores[s0][name], other.scores[s0][against], run.errors)
    first = metrics.paired_bootstrap(*both, n_boot=n_boot, comparisons=compared)
    per_seed = [metrics.auroc(run.scores[s][name], run.errors) - metrics.auroc(other.scores[s][against], run.errors) for s in seeds]
    return {**first, "seeds": per_seed, **{f"seeds_{k}": v for k, v in metrics.spread(per_seed).items()}}


def fmt_delta(d: dict | None) -> str:
    if d is None:
        return "—"
    lo, hi = d["ci"]
    corrected = f" ({d['corrected_ci'][0]:+.3f}, {d['corrected_ci'][1]:+.3f})" if "corrected_ci" in d else ""
    over = f"; {d['seeds_mean']:+.3f} ± {d['seeds_sd']:.3f} ({len(d['seeds'])})" if len(d["seeds"]) > 1 else ""
    return f"{d['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]{corrected}{over}"


def table_names(runs: list[Run]) -> list[str]:
    """The estimators a table shows, each from the first run that has it."""
    return list(dict.fromkeys(name for run in runs for name in run.names))


def table(runs: list[Run], n_boot: int) -> tuple[list[str], list[dict]]:
    reference = find(runs, "msp")
    latent = find(runs, "latent_nll")
    lines = [
        "| estimator | kind | run | seeds | AUROC, first seed [95% CI] | over seeds, mean ± sd | "
        "Δ vs `msp` [95% CI] (corrected); over seeds | Δ vs `latent_nll` [95% CI] (corrected); over seeds | cost (fwd) |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    shown = table_names(runs)
    compared = max(len(shown) - 1, 1)  # each reference against every other estimator of the table
    records, seen = [], set()
    for run in runs:
        for name in run.names:
            if name in seen:  # read from the first run that has it
                continue
            seen.add(name)
            label = name
            s0 = run.seeds[0]
            ci = metrics.bootstrap_ci(metrics.auroc, run.scores[s0][name], run.errors, n_boot=n_boot)
            aurocs = [metrics.auroc(run.scores[s][name], run.errors) for s in run.seeds]
            over = metrics.spread(aurocs)
            record = {
                "estimator": name, "run": str(run.folder), "kind": KIND.get(name.split(" (")[0], "other"), "seeds": run.seeds,
                "auroc": aurocs[0], "auroc_ci": ci["ci"] if isinstance(ci, dict) else list(ci), "aurocs": aurocs,
                "vs_msp": paired(run, name, reference, "msp", n_boot, compared),
                "vs_latent_nll": paired(run, name, latent, "latent_nll", n_boot, compared),
                "cost_forward_equiv": run.cost(name),
            }
            records.append(record)
            lo, hi = record["auroc_ci"]
            sd = f" ± {over['sd']:.3f}" if len(aurocs) > 1 else ""
            lines.append(
                f"| `{label}` | {record['kind']} | {run.folder.name} | {len(run.seeds)} | {aurocs[0]:.3f} [{lo:.3f}, {hi:.3f}] | "
                f"{over['mean']:.3f}{sd} | {fmt_delta(record['vs_msp'])} | {fmt_delta(record['vs_latent_nll'])} | "
                f"{record['cost_forward_equiv']:.2f} |"
            )
    return lines, records


def figure(runs: list[Run], path: Path) -> None:
    """Each estimator's rank (first seed) against ``msp``'s, correct and wrong completions apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = find(runs, "msp")
    names = [nm for nm in FIGURE if find(runs, nm) is not None]
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    def rank(x):
        return np.argsort(np.argsort(x, kind="stable"), kind="stable") / (len(x) - 1)

    x = rank(reference.scores[reference.seeds[0]]["msp"])
    wrong = reference.errors == 1
    for ax, name in zip(axes.flat, names, strict=False):
        run = find(runs, name)
        y = rank(run.scores[run.seeds[0]][name])
        ax.scatter(x[~wrong], y[~wrong], s=4, alpha=0.5, color="tab:blue", label="correct")
        ax.scatter(x[wrong], y[wrong], s=4, alpha=0.5, color="tab:red", label="wrong")
        auc = metrics.auroc(run.scores[run.seeds[0]][name], run.errors)
        ax.set_title(f"{name}: {KIND.get(name.split(' (')[0], '')}, AUROC {auc:.3f}", fontsize=9)
        ax.set_xlabel("rank of msp", fontsize=8)
        ax.set_ylabel(f"rank of {name}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, markerscale=3, loc="upper left")
    fig.suptitle(f"{len(x)} idioms, out-of-fold: each estimator's rank against msp's (first seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finding(record: dict) -> str:
    """Where an estimator stands against ``msp`` on its model: ahead or behind (the paired interval,
    corrected for the table's comparisons, excludes 0), or not told apart."""
    d = record.get("vs_msp")
    if d is None:
        return "reference"
    lo, hi = d.get("corrected_ci", d["ci"])
    return "ahead" if lo > 0 else "behind" if hi < 0 else "not separated"


def across(first: str, records: list[dict], models: list[tuple[str, list[dict], list[Run]]]) -> list[str]:
    """Each estimator on the first model and on each other model, side by side: its AUROC, its Δ
    against ``msp`` and against ``latent_nll`` (each paired within its model), and whether its
    standing against ``msp`` (ahead, behind, not separated) replicates. Labels differ between
    models (each model's own completions), so nothing is paired across models."""
    heads = [first, *(name for name, _, _ in models)]
    lines = [
        "| estimator | kind | " + " | ".join(
            f"{h}: AUROC, mean ± sd over seeds | {h}: Δ vs `msp` [95% CI] (corrected) | {h}: Δ vs `latent_nll` [95% CI] (corrected)"
            for h in heads)
        + " | replicates? |",
        "|:---|:---|" + "---:|---:|---:|" * len(heads) + ":---|",
    ]
    by_model = [{r["estimator"]: r for r in recs} for _, recs, _ in models]
    for record in records:
        name = record["estimator"]
        others = [m.get(name) for m in by_model]
        if any(o is None for o in others):  # a tagged run ("adapter_nll (twin)") where each model has one
            continue
        cells, standings = [], []
        for rec in (record, *others):
            spread = metrics.spread(rec["aurocs"])
            sd = f" ± {spread['sd']:.3f} ({len(rec['aurocs'])})" if len(rec["aurocs"]) > 1 else " (1)"
            deltas = [
                "—" if d is None else f"{d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
                + (f" ({d['corrected_ci'][0]:+.3f}, {d['corrected_ci'][1]:+.3f})" if "corrected_ci" in d else "")
                for d in (rec.get("vs_msp"), rec.get("vs_latent_nll"))
            ]
            cells += [f"{spread['mean']:.3f}{sd}", *deltas]
            standings.append(finding(rec))
        same = "—" if standings[0] == "reference" else ("yes: " + standings[0]) if len(set(standings)) == 1 else (
            "no: " + ", ".join(standings))
        lines.append(f"| `{name}` | {record['kind']} | " + " | ".join(cells) + f" | {same} |")
    return lines


def describe(run: Run) -> str:
    """One line on what a run trained and scored, from its results.json."""
    protocol = run.results["protocol"]
    latent = protocol.get("latent") or {}
    ensemble = protocol.get("ensemble")
    what = f"`{protocol.get('training_config', '?')}` (prior {latent.get('prior', 'conditional')})"
    members = f", {ensemble} latents per seed and fold" if ensemble and ensemble > 1 else ""
    stamps = run.results.get("computed_with") or []
    where = "; ran at " + ", ".join(f"{s.get('threads')} thread(s), torch {s.get('torch')}" for s in stamps) if stamps else (
        "; where it ran was not recorded")
    return (f"`{run.folder}`: {what}, seeds {', '.join(run.seeds)}{members}{where}; "
            f"estimators {', '.join(f'`{n}`' for n in run.names)}")


def ranked(lines: list[str], records: list[dict]) -> list[str]:
    """The table's rows, highest mean AUROC over seeds first."""
    order = sorted(range(len(records)), key=lambda i: -float(np.nanmean(records[i]["aurocs"])))
    return [lines[0], lines[1], *(lines[2 + i] for i in order)]


def page(
    runs: list[Run],
    lines: list[str],
    records: list[dict],
    figure_path: str,
    transfer: tuple[list[Run], list[str], list[dict]] | None,
    models: list[tuple[str, list[dict], list[Run]]] = (),
    regenerate: str = "make verdict",
    confirm_link: str = "confirm/report.md",
) -> str:
    """The results page: the protocol, the table (highest mean AUROC first), the figure, the
    other models side by side, the transfer check, the runs."""
    first = runs[0]
    n, acc = len(first.errors), 1 - first.errors.mean()
    protocol = first.results["protocol"]
    body = ranked(lines, records)
    order = sorted(records, key=lambda r: -float(np.nanmean(r["aurocs"])))
    side = []
    for name, _, (run, *beside) in models:
        other = run.results
        side += [
            f"- **{name}** (`{run.folder}`): {len(run.errors)} idioms, accuracy {1 - run.errors.mean():.3f}, "
            f"{other['protocol'].get('folds')} folds, seeds {', '.join(run.seeds)}, latent from "
            f"`{other['protocol'].get('training_config')}`; every setting its config's, fixed before the run.",
            *(f"  - with {describe(r)}" for r in beside),
        ]
    if models:
        side = [
            "## Across models: does each finding replicate?",
            "",
            f"The same protocol on another model family: the same {n} idioms, each model's own greedy completions "
            "(so its own labels: nothing is paired across models). Each Δ is paired within its model, against that "
            "model's own `msp` and its own variational latent's `latent_nll`. *Replicates?* compares where each "
            "estimator stands against `msp` on its own model: ahead or behind (the paired interval, Bonferroni-corrected "
            "for its table's comparisons, in parentheses, excludes 0) or not separated.",
            "",
            *side,
            "",
            *across(first.results.get("model", "first"), order, models),
            "",
        ]
    moved = []
    if transfer is not None:
        t_runs, t_lines, t_records = transfer
        extra = t_runs[0].results["protocol"]
        moved = [
            "## Transfer: latents trained on other expressions only",
            "",
            f"Each latent trains on the {extra.get('n_extra_train')} idioms of `{extra.get('extra_train')}` alone "
            f"(one fold; {extra.get('n_extra_dropped')} left out as a scored idiom or a variant of one) and scores all "
            f"{n} idioms above, none of which it saw in any form. Δ vs `latent_nll` is against this check's own "
            "variational latent.",
            "",
            *ranked(t_lines, t_records),
            "",
            *(f"- {describe(r)}" for r in t_runs),
            "",
        ]
    out = [
        f"# Results: {first.results.get('model', '')}, cross-fitted",
        "",
        f"**{n} idioms** of `{protocol.get('data')}`, base-model accuracy **{acc:.3f}** (greedy completions). "
        f"{protocol.get('folds')} folds dealt by a hash seeded with {protocol.get('fold_seed')}: every latent is "
        "trained on the other folds' idioms and scores its own, so every latent score is out-of-fold. Every "
        "setting comes from the training YAMLs and the estimators' defaults, fixed before these runs. Two "
        "estimators were not: `latent_nll` and `adapter_nll` were added after looking at these same items' "
        "cross-fitted scores (docs/ideas/README.md), so their figures here are exploratory; the preregistered "
        f"run on WordNet expressions no one here wrote ([confirm/report.md]({confirm_link})) is their test.",
        "",
        "Each estimator is read from the first run below that has it. The interval is a percentile bootstrap over "
        "items on the first seed; Δ is paired on the same items and seed (paired bootstrap), then the mean ± sd of "
        "the per-seed Δ over the seeds both runs have. The interval in parentheses is the same Δ's, Bonferroni-corrected "
        f"for the {max(len(records) - 1, 1)} comparisons of this table against each reference (level 1 − 0.05/"
        f"{max(len(records) - 1, 1)}, on the same resamples). *Kind*: `baseline` needs no latent; `mean` is a latent's "
        "prediction of ŷ; `spread` is a latent's uncertainty about z or about its own weights; `fitted` is fitted "
        "on other folds' labels. Cost is in plain forwards of the base model over the same items, from each run's "
        "own timing; training a latent is not in it (an ensemble of M trains M). Runs that shared the CPU with "
        "other runs time their parts under different loads, so these costs are rough; `make bench` measures "
        "them side by side.",
        "",
        *body,
        "",
        "## Mean versus spread, item by item",
        "",
        f"![Each estimator's rank against msp's, correct and wrong completions apart]({figure_path})",
        "",
        *side,
        *moved,
        "## The runs",
        "",
        *(f"- {describe(r)}" for r in runs),
        "",
        f"Regenerate with `{regenerate}` (each run resumes from its units; `python experiments/verdict.py` pairs them).",
    ]
    return "\n".join(out) + "\n"


def same_items(first: Run, others: list[Run]) -> None:
    """Refuse runs that do not score ``first``'s items with ``first``'s labels (nothing would pair)."""
    for run in others:
        if run.idioms != first.idioms or not np.array_equal(run.errors, first.errors):
            raise SystemExit(f"error: {run.folder} and {first.folder} do not score the same items with the same labels")


def model_runs(specs: list[str]) -> dict[str, list[Run]]:
    """``--model`` specs grouped by model, in the order given: ``NAME=FOLDER``, or ``NAME:TAG=FOLDER`` for
    another run of the same model whose latent estimators read "name (TAG)" (its twin, say), as ``--run TAG=FOLDER``."""
    groups: dict[str, list[Run]] = {}
    for spec in specs:
        head, _, folder = spec.rpartition("=")
        name, _, tag = head.partition(":")
        run = Run(f"{tag}={folder}" if tag else folder)
        groups.setdefault(name or run.results.get("model", folder), []).append(run)
    for group in groups.values():
        same_items(group[0], group[1:])
    return groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", action="append", required=True,
        help="a vtrans crossval output folder, or TAG=FOLDER to keep its latent estimators apart as 'name (TAG)' (repeat)",
    )
    parser.add_argument("--out", required=True, help="folder for verdict.md, verdict.json and mean_vs_spread.png")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--markdown", default=None, help="also write the results page here (e.g. docs/results.md)")
    parser.add_argument("--transfer", action="append", default=[], help="a run of the transfer check (repeat): its own table")
    parser.add_argument("--regenerate", default="make verdict", help="the command the page names to rebuild it")
    parser.add_argument(
        "--model", action="append", default=[],
        help="NAME=FOLDER: another model's cross-fitted run, set beside the first model's estimators; "
        "NAME:TAG=FOLDER adds another run of that model, its latent estimators read 'name (TAG)' (repeat)",
    )
    args = parser.parse_args(argv)
    runs = [Run(r) for r in args.run]
    transfer_runs = [Run(r) for r in args.transfer]
    same_items(runs[0], runs[1:] + transfer_runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines, records = table(runs, args.n_boot)
    n, acc = len(runs[0].errors), 1 - runs[0].errors.mean()
    head = [
        f"{n} idioms, accuracy {acc:.3f}; every score out-of-fold (5 folds). The interval is a bootstrap over items "
        f"({args.n_boot} resamples) on the first seed; Δ is paired on the same items and seed, then the mean ± sd of "
        "the per-seed Δ over the seeds both have. Runs: " + ", ".join(f"`{r.folder}` (seeds {', '.join(r.seeds)})" for r in runs),
        "",
    ]
    (out / "verdict.md").write_text("\n".join(head + lines) + "\n", encoding="utf-8")
    (out / "verdict.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    figure(runs, out / "mean_vs_spread.png")
    transfer = None
    if transfer_runs:
        t_lines, t_records = table(transfer_runs, args.n_boot)
        transfer = (transfer_runs, t_lines, t_records)
        (out / "transfer.md").write_text("\n".join(t_lines) + "\n", encoding="utf-8")
        (out / "transfer.json").write_text(json.dumps(t_records, indent=1) + "\n", encoding="utf-8")
    models = [(name, table(group, args.n_boot)[1], group) for name, group in model_runs(args.model).items()]
    if models:
        side = across(runs[0].results.get("model", "first"), sorted(records, key=lambda r: -float(np.nanmean(r["aurocs"]))), models)
        (out / "models.md").write_text("\n".join(side) + "\n", encoding="utf-8")
    if args.markdown:
        md = Path(args.markdown)
        figure_path = os.path.relpath(out / "mean_vs_spread.png", md.parent)
        confirm_link = os.path.relpath(Path(__file__).resolve().parents[1] / "docs" / "confirm" / "report.md", md.resolve().parent)
        md.write_text(page(runs, lines, records, figure_path, transfer, models, args.regenerate, confirm_link), encoding="utf-8")
    print("\n".join(head + lines))


if __name__ == "__main__":
    main()
