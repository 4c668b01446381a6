"""Answers of K = 1, 2 and 3 words side by side: ``docs/multitoken/results.md`` from the cross-fitted runs.

Each run is ``vtrans crossval --answer_words K`` on the built-in idioms (the answer is the idiom's
last K words; an idiom that would keep fewer than two prompt words is left out). For each K the
page gives n, the accuracy of whole answers, and for every estimator its AUROC (mean over seeds,
each seed's, their sd), its cost in forwards, and its paired Δ against the **best cheap
sequence-level baseline** of that K: of the names in :data:`SEQUENCE_BASELINES` (read off one
forward of the whole answer, or the sampled whole answers compared), the one with the highest mean
AUROC there. That rule was fixed before any K ≥ 2 score was seen; choosing on the scored items
only raises the bar for the others. Δ is the difference of mean-over-seeds AUROCs, its 95%
interval a paired bootstrap over items (the same resamples for every estimator), with the
Bonferroni-corrected interval over the estimators of that K's table beside it.

    python experiments/multitoken.py docs/multitoken/k1 docs/multitoken/k2 docs/multitoken/k3 \\
        --lens_last 2=docs/multitoken/lens-last-k2 --lens_last 3=docs/multitoken/lens-last-k3 \\
        --markdown docs/multitoken/results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vtrans.evaluation import metrics  # noqa: E402

SEQUENCE_BASELINES = (
    "sequence_nll",
    "perplexity",
    "max_token_nll",
    "sequence_doubt",
    "mean_token_entropy",
    "rauq",
    "sample_disagreement",
    "sample_word_entropy",
)
READS = {
    "msp": "first token",
    "entropy": "first token",
    "lens_ce": "first token, every layer",
    "posterior_var": "latent, first token",
    "latent_mi": "latent, first token",
    "latent_nll": "latent, first token",
    "adapter_nll": "latent, first token",
    "cocoa": "first token × sampled answers",
    "sample_disagreement": "sampled whole answers",
    "sample_word_entropy": "sampled whole answers",
    "adapter_answer_nll": "latent, whole answer",
    "latent_answer_nll": "latent, whole answer",
    "latent_answer_gap": "latent, whole answer",
    "probe": "first token's single-pass features, fitted",
    "probe_latent": "the probe's features + `adapter_nll`, fitted",
    "state_probe": "residual state where the answer starts, fitted",
    "state_probe_latent": "that state + `adapter_nll`, fitted",
    "se_probe": "that state, fitted to the sampled answers' entropy (no labels)",
    "mc_dropout_answer_nll": "16 dropout masks, whole answer",
    "mc_dropout_answer_gap": "16 dropout masks, whole answer",
    "attention_entropy": "first token's attention",
    "latent_kl": "latent, first token",
}
MARGIN = 0.02
"""The equivalence margin of the twin comparison: the one ``docs/confirm/preregistration.md`` fixed for
the same question (H2) before any score of these runs existed."""
PLOTTED = ("msp", "sequence_nll", "perplexity", "rauq", "sample_disagreement", "adapter_nll", "adapter_answer_nll", "latent_answer_nll")


def seeds_of(row: dict) -> list[dict]:
    return [row["scores"], *(row.get("scores_by_seed") or {}).values()]


class Run:
    """One K's run: its results.json, and per estimator one (n,) score column per seed."""

    def __init__(self, folder: Path, n_boot: int) -> None:
        self.folder = folder
        self.results = json.loads((folder / "results.json").read_text())
        rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
        self.k = self.results["config"]["answer_words"]
        self.idioms = [r["idiom"] for r in rows]
        self.errors = np.array([not r["correct"] for r in rows], dtype=float)
        self.names = [n for n in self.results["estimators"] if all(n in s for s in seeds_of(rows[0]))]
        self.cols = {n: [np.array([seeds_of(r)[s][n] for r in rows], dtype=float) for s in range(len(seeds_of(rows[0])))]
                     for n in self.names}
        rng = np.random.default_rng(0)
        self.draws = [rng.integers(0, len(rows), len(rows)) for _ in range(n_boot)]
        self.boot = {n: np.array([self.mean_auroc(n, ix) for ix in self.draws]) for n in self.names}
        baselines = [n for n in SEQUENCE_BASELINES if n in self.names]
        self.reference = max(baselines, key=self.mean_auroc)

    def mean_auroc(self, name: str, ix: np.ndarray | slice = slice(None)) -> float:
        return float(np.mean([metrics.auroc(c[ix], self.errors[ix]) for c in self.cols[name]]))

    def per_seed(self, name: str) -> list[float]:
        return [metrics.auroc(c, self.errors) for c in self.cols[name]]

    def delta(self, name: str, comparisons: int) -> tuple[float, tuple[float, float], tuple[float, float]]:
        return paired(self, name, self, self.reference, comparisons)


def paired(
    run: Run, name: str, base: Run, base_name: str, comparisons: int
) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """``run``'s ``name`` − ``base``'s ``base_name``: the difference of mean AUROCs, its 95% paired
    bootstrap interval and that interval Bonferroni-corrected over ``comparisons`` (the runs score the
    same items, so their draws, seeded alike, resample the same items)."""
    d = run.boot[name] - base.boot[base_name]
    a = 0.025 / comparisons
    raw = tuple(np.percentile(d, [2.5, 97.5]))
    corrected = tuple(np.percentile(d, [100 * a, 100 * (1 - a)]))
    return run.mean_auroc(name) - base.mean_auroc(base_name), raw, corrected


def table(run: Run, title: str | None = None) -> list[str]:
    m = len(run.names) - 1
    n, wrong = len(run.errors), int(run.errors.sum())
    lines = [
        title or f"## K = {run.k}",
        "",
        f"n = {n} idioms ({wrong} answers wrong; accuracy {1 - wrong / n:.3f}), {len(run.cols[run.names[0]])} seeds, "
        f"{run.results['protocol']['folds']} folds. Reference: **`{run.reference}`** (AUROC {run.mean_auroc(run.reference):.3f}). Δ is paired against it; "
        f"the corrected interval is Bonferroni over the {m} comparisons of this table.",
        "",
        "| estimator | reads | AUROC (mean over seeds) | per seed (sd) | Δ vs reference [95% CI] | Bonferroni-corrected CI | cost (forwards) |",
        "|---|---|---:|---|---|---|---:|",
    ]
    for name in sorted(run.names, key=run.mean_auroc, reverse=True):
        per = run.per_seed(name)
        sd = np.std(per, ddof=1) if len(per) > 1 else float("nan")
        cost = run.results["estimators"][name].get("cost_forward_equiv")
        if name == run.reference:
            delta = "— (reference)"
            corrected = "—"
        else:
            d, (lo, hi), (clo, chi) = run.delta(name, m)
            delta, corrected = f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]", f"[{clo:+.3f}, {chi:+.3f}]"
        reads = READS.get(name, "whole answer, one forward")
        cost_text = f"{cost:.2f}" if cost is not None else "—"
        lines.append(
            f"| `{name}` | {reads} | {run.mean_auroc(name):.3f} | {', '.join(f'{a:.3f}' for a in per)} ({sd:.3f}) | "
            f"{delta} | {corrected} | {cost_text} |"
        )
    return lines


def plot(runs: list[Run], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ks = [r.k for r in runs]
    for name in PLOTTED:
        if all(name in r.names for r in runs):
            ax.plot(ks, [r.mean_auroc(name) for r in runs], marker="o", label=name)
    ax.set_xticks(ks, [f"K = {k}" for k in ks])
    ax.set_ylabel("AUROC (mean over seeds)")
    ax.set_title("Is the answer wrong? Answers of K words, cross-fitted")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def by_layer(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the AUROC of the logit lens's −log p (``lens_ce_by_layer``) of a run's rows, and their errors."""
    rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    errors = np.array([not r["correct"] for r in rows], dtype=float)
    layers = np.array([r["lens_ce_by_layer"] for r in rows], dtype=float)  # (n, L+1)
    return np.array([metrics.auroc(layers[:, i], errors) for i in range(layers.shape[1])]), errors


def lens_section(runs: list[Run], last: dict[int, Path], path: Path) -> list[str]:
    """The lens's by-layer AUROC at the answer's first token (the K run, ``--aggregate first``) and at
    its last (a run with ``--aggregate last`` on the same idioms), with the figure."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines = [
        "## The logit lens on later tokens",
        "",
        "The lens's −log p(ŷ) layer by layer (`lens_ce_by_layer`), read at the answer's first token (the runs",
        "above, `--aggregate first`) and at its last token (`--aggregate last`, one run of the base model on",
        "the same idioms and labels: the lens has no seed). AUROC per layer for \"is the whole answer wrong?\":",
        "",
        "| K | token | AUROC at the output layer | best layer (AUROC) | mean over layers |",
        "|---|---|---:|---:|---:|",
    ]
    for run in runs:
        if run.k not in last:
            continue
        first, errors = by_layer(run.folder)
        final, errors_last = by_layer(last[run.k])
        if not np.array_equal(errors, errors_last):
            raise SystemExit(f"{last[run.k]} labels its items otherwise than {run.folder}: not the same items")
        for token, curve in (("first", first), ("last", final)):
            best = int(np.nanargmax(curve))
            lines.append(
                f"| {run.k} | {token} | {curve[-1]:.3f} | {best} ({curve[best]:.3f}) | {np.nanmean(curve[1:]):.3f} |"
            )
            ax.plot(range(len(curve)), curve, label=f"K = {run.k}, {token} token", linestyle="-" if token == "first" else "--")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("layer (0: embeddings)")
    ax.set_ylabel("AUROC of the lens's −log p(ŷ)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [*lines, "", f"![The lens by layer]({path.name})", ""]


def same_items(run: Run, other: Run) -> None:
    if run.idioms != other.idioms or not np.array_equal(run.errors, other.errors):
        raise SystemExit(f"{other.folder} scores other items, or labels them otherwise, than {run.folder}")


def fitted_section(main: Run, fitted: Run, twin: Run | None) -> list[str]:
    """The fitted families at K (one run, latents trained on its answers) and the deterministic twin,
    paired with the variational latent of that run item by item."""
    same_items(main, fitted)
    lines = table(fitted, f"## K = {fitted.k}: the fitted families and MC dropout")
    lines[2] += (
        " The probes are fitted on the other folds' items and labels of whole answers, exactly as at K = 1;"
        " the state probes read the residual stream where the answer starts (the position that predicts"
        " its first token), the probe the first token's single-pass features."
    )
    shared = [n for n in ("adapter_answer_nll", "adapter_nll") if n in main.names and n in fitted.names]
    if shared:
        gap = max(float(np.max(np.abs(a - b))) for n in shared for a, b in zip(main.cols[n], fitted.cols[n], strict=True))
        lines += ["", f"Retrained under the same seeds, folds and threads, this run's latents give `{'`, `'.join(shared)}` "
                  f"as the K = {main.k} run's do, item by item (largest difference {gap:.1e})."]
    if twin is None:
        return lines
    same_items(fitted, twin)
    pairs = [n for n in ("adapter_answer_nll", "adapter_nll") if n in twin.names and n in fitted.names]
    lines += [
        "",
        f"### K = {fitted.k}: the deterministic twin",
        "",
        "The twin (`configs/smollm2-twin.yaml`: z the prior network's mean, no noise, no KL) trained on the same",
        "answers, folds and seeds. Δ is twin − variational, paired over items (the same bootstrap draws);",
        f"the corrected interval is Bonferroni over these {len(pairs)} comparisons. \"equivalent\" means the",
        f"corrected interval lies inside ±{MARGIN} AUROC, the margin fixed in advance (`docs/confirm/preregistration.md`, H2).",
        "",
        "| score | variational | twin (per seed) | Δ twin − variational [95% CI] | corrected CI | verdict |",
        "|---|---:|---|---|---|---|",
    ]
    for name in pairs:
        d, (lo, hi), (clo, chi) = paired(twin, name, fitted, name, len(pairs))
        verdict = "equivalent" if -MARGIN < clo and chi < MARGIN else ("twin ahead" if clo > 0 else "variational ahead" if chi < 0 else "not separated")
        lines.append(
            f"| `{name}` | {fitted.mean_auroc(name):.3f} | {twin.mean_auroc(name):.3f} "
            f"({', '.join(f'{x:.3f}' for x in twin.per_seed(name))}) | {d:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] | [{clo:+.3f}, {chi:+.3f}] | {verdict} |"
        )
    return lines


def summary(runs: list[Run]) -> list[str]:
    lines = [
        "| | " + " | ".join(f"K = {r.k}" for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
        "| idioms (n) | " + " | ".join(str(len(r.errors)) for r in runs) + " |",
        "| accuracy of the whole answer | " + " | ".join(f"{1 - r.errors.mean():.3f}" for r in runs) + " |",
        "| best cheap sequence-level baseline | " + " | ".join(f"`{r.reference}` {r.mean_auroc(r.reference):.3f}" for r in runs) + " |",
    ]
    for name in ("msp", "adapter_nll", "adapter_answer_nll", "latent_answer_nll", "latent_nll"):
        if all(name in r.names for r in runs):
            cells = []
            for r in runs:
                d, _, (clo, chi) = r.delta(name, len(r.names) - 1)
                cells.append(f"{r.mean_auroc(name):.3f} (Δ {d:+.3f}, corrected [{clo:+.3f}, {chi:+.3f}])")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="vtrans crossval output folders, one per K")
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("--n_boot", type=int, default=2000)
    parser.add_argument("--lens_last", action="append", default=[], metavar="K=DIR",
                        help="a run of the lens with --aggregate last at answers of K words")
    parser.add_argument("--fitted", type=Path, help="a run of the fitted families and MC dropout at one K of the runs")
    parser.add_argument("--twin", type=Path, help="the deterministic twin's run at that K (with --fitted)")
    parser.add_argument("--gemma", type=Path, help="Gemma 3's run at one K")
    args = parser.parse_args()
    last = {int(k): Path(d) for k, d in (item.split("=", 1) for item in args.lens_last)}
    runs = sorted((Run(f, args.n_boot) for f in args.runs), key=lambda r: r.k)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    figure = args.markdown.parent / "auroc_by_k.png"
    plot(runs, figure)
    protocol = runs[0].results["protocol"]
    text = [
        "# Answers of several words: K = " + ", ".join(str(r.k) for r in runs),
        "",
        "The question as before, \"is this answer wrong?\", with the answer the idiom's last K words: the",
        "model completes the prompt greedily until K words are complete, and the item is correct when they",
        "equal the idiom's. Every latent is trained on answers of its K (the ELBO's likelihood covers every",
        f"answer token under one z). Every figure is cross-fitted ({protocol['folds']} folds by idiom, "
        f"{len(protocol['seeds'])} seeds); nothing was",
        "chosen on these scores, and the estimators of the whole answer are new here: their rows are",
        "exploratory until data they never saw confirms them.",
        "",
        *summary(runs),
        "",
        f"![AUROC by K]({figure.name})",
        "",
    ]
    for run in runs:
        text += [*table(run), ""]
    every = list(runs)
    if args.fitted:
        fitted = Run(args.fitted, args.n_boot)
        twin = Run(args.twin, args.n_boot) if args.twin else None
        main_run = next((r for r in runs if r.k == fitted.k), None)
        if main_run is None:
            raise SystemExit(f"{args.fitted} answers in {fitted.k} words, which none of the runs does")
        text += [*fitted_section(main_run, fitted, twin), ""]
        every += [fitted] + ([twin] if twin else [])
    if args.gemma:
        gemma = Run(args.gemma, args.n_boot)
        gemma_lines = table(gemma, f"## K = {gemma.k} on Gemma 3 270M")
        gemma_lines[2] += f" Gemma 3 ran on {len(gemma.results['protocol']['seeds'])} seed(s), as the CPU allowed."
        text += [*gemma_lines, ""]
        every.append(gemma)
    if last:
        text += lens_section(runs, last, args.markdown.parent / "lens_by_layer_first_last.png")
    where = sorted({json.dumps(c) for r in every for c in r.results.get("computed_with") or []})
    unrecorded = [str(r.folder) for r in every if not r.results.get("computed_with")]
    text += [
        f"Computed with {', '.join(where) or 'an unrecorded setting'}"
        + (f" (not recorded for {', '.join(unrecorded)})" if unrecorded else "")
        + ". Regenerate: `make multitoken` (the runs, then this page).",
        "",
    ]
    args.markdown.write_text("\n".join(text), encoding="utf-8")
    print(f"wrote {args.markdown} and {figure}")


if __name__ == "__main__":
    main()
