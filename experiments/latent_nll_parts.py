"""Where ``latent_nll``'s signal comes from: the latent's mean, or its spread.

``latent_nll`` is −log E_z p(ŷ|prompt, z) with z drawn from the latent's inference distribution.
For the fold latents of a cross-fitted run (``vtrans crossval --save_checkpoints``) this scores
every item, out of fold, three ways:

* ``msp``-equivalent: the base model's −log p(ŷ|prompt) (no latent);
* ``latent_nll_at_mean``: −log p(ŷ|prompt, z = the distribution's mean) (one pass, no spread);
* ``latent_nll``: the estimator itself (S draws of z).

If the mean alone does as well, the gain is the trained latent shifting the prediction, not its
uncertainty about z.

    python experiments/latent_nll_parts.py --run docs/crossval --seed 0 --out docs/ideas/latent-nll/parts.md
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from vtrans.backbone.loading import Backbone
from vtrans.data import load_idioms
from vtrans.estimators import latent as latent_estimators
from vtrans.estimators.runner import Runner
from vtrans.evaluation import metrics
from vtrans.evaluation.evaluate import EvalConfig
from vtrans.latent import checkpoint
from vtrans.latent.training import read_training_config


def _no_noise(indices: list[int], samples: int, d_z: int, seed: int, draws: str = "random") -> torch.Tensor:
    """z = the distribution's mean: zero noise in place of :func:`vtrans.estimators.latent.item_noise`."""
    return torch.zeros((len(indices), samples, d_z))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a vtrans crossval output folder written with --save_checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", required=True, help="a markdown file")
    args = parser.parse_args(argv)
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    proto = results["protocol"]
    rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    if "lens_ce" not in rows[0]["scores"]:
        raise SystemExit(f"error: {run} has no lens_ce scores (the base model's −log p(ŷ)): run it with lens_ce")
    items = {it.idiom: it for it in load_idioms(proto["data"])}
    spec = read_training_config(proto["training_config"])
    backbone = Backbone(**spec.backbone)
    config = EvalConfig(samples=args.samples, seed=args.seed, template=results["config"]["template"])
    base = Runner(backbone, None, config, progress=True)
    ordered = [items[r["idiom"]] for r in rows]
    prompts, completions, correct = base.label(ordered, config.template)
    if [bool(c) for c in correct] != [r["correct"] for r in rows]:
        raise SystemExit("error: the labels differ from the run's: not the same model, data or template")
    errors = np.array([0.0 if c else 1.0 for c in correct])
    folds = np.array([r["fold"] for r in rows])
    scores = {
        "base −log p(ŷ)": np.array([r["scores"]["lens_ce"] for r in rows]),  # seed-free: the run's own
        "latent_nll_at_mean": np.full(len(rows), np.nan),
        "latent_nll": np.full(len(rows), np.nan),
    }
    for fold in sorted(set(folds.tolist())):
        module = checkpoint.load(run / "checkpoints" / f"seed{args.seed}-fold{fold}.ckpt", backbone=backbone)
        idx = np.flatnonzero(folds == fold)
        part = ([prompts[i] for i in idx], [completions[i] for i in idx], ["latent_nll"])
        runner = Runner(backbone, module, config, progress=False)
        sampled = runner.scores(*part, indices=idx.tolist())
        scores["latent_nll"][idx] = sampled["latent_nll"].double().numpy()
        at_mean = Runner(backbone, module, replace(config, samples=2), progress=False)  # two identical draws
        with mock.patch.object(latent_estimators, "item_noise", _no_noise):
            mean = at_mean.scores(*part, indices=idx.tolist())
        scores["latent_nll_at_mean"][idx] = mean["latent_nll"].double().numpy()
    reference = scores["base −log p(ŷ)"]
    lines = [
        f"# Where `latent_nll`'s signal comes from ({len(rows)} items of `{proto['data']}`, seed {args.seed})",
        "",
        f"Command: `python experiments/latent_nll_parts.py --run {args.run} --seed {args.seed} --out {args.out}`; "
        f"the fold latents of `{args.run}`, every item scored by the latent that did not train on it; "
        f"S = {args.samples}; Δ is paired against the base model's −log p(ŷ) (= `msp` in ranking).",
        "",
        "| score | AUROC [95% CI] | Δ vs base [95% CI] |",
        "|---|---:|---:|",
    ]
    for name, values in scores.items():
        ci = metrics.bootstrap_ci(metrics.auroc, values, errors, n_boot=args.n_boot)
        cell = f"{metrics.auroc(values, errors):.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        if name == "base −log p(ŷ)":
            lines.append(f"| {name} | {cell} | — |")
            continue
        paired = metrics.paired_bootstrap(metrics.auroc, values, reference, errors, n_boot=args.n_boot)
        lo, hi = paired["ci"]
        lines.append(f"| `{name}` | {cell} | {paired['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
