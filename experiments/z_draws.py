"""How much ``latent_mi`` moves with its z draws, by draw scheme and number of samples, and what it costs.

For one checkpoint and its held-out items, ``latent_mi`` is computed R times with R different
noise seeds for each scheme (independent, antithetic, randomised Sobol) and each S. Reported:
the per-item spread across seeds (mean over items of sd / mean), the AUROC over seeds (mean ± sd),
and the seconds of one pass over the items.

    python experiments/z_draws.py --ckpt checkpoints/smollm2/last.ckpt --data builtin:test --out docs/z_draws
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vtrans.data import idiom_hash, load_split
from vtrans.estimators.runner import Runner
from vtrans.evaluation import metrics
from vtrans.evaluation.evaluate import EvalConfig
from vtrans.latent import checkpoint


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", default="builtin:test")
    parser.add_argument("--samples", default="8,32", help="comma-separated S values")
    parser.add_argument("--repeats", type=int, default=5, help="noise seeds per (scheme, S)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    module = checkpoint.load(args.ckpt)
    contents = checkpoint.read(args.ckpt)
    recorded = checkpoint.split_settings(contents) or {}
    settings = {k: v for k, v in recorded.items() if k in ("seed", "val_fraction", "test_fraction")}
    items = load_split(args.data, None, **settings)
    trained = checkpoint.trained_idiom_hashes(contents) or set()
    items = [it for it in items if idiom_hash(it.idiom) not in trained]
    base = Runner(module.backbone, module, EvalConfig(), progress=False)
    prompts, completions, correct = base.label(items, checkpoint.template_in(contents) or EvalConfig().template)
    errors = np.array([0.0 if c else 1.0 for c in correct])
    rows = []
    for samples in [int(s) for s in args.samples.split(",")]:
        for draws in ("random", "antithetic", "sobol"):
            runs, seconds = [], []
            for seed in range(args.repeats):
                runner = Runner(module.backbone, module, EvalConfig(samples=samples, z_draws=draws, seed=seed), False)
                start = time.perf_counter()
                scores = runner.scores(prompts, completions, ["latent_mi"])
                seconds.append(time.perf_counter() - start)
                runs.append(scores["latent_mi"].double().numpy())
            values = np.stack(runs)  # (R, n)
            aurocs = [metrics.auroc(v, errors) for v in values]
            over_seeds = metrics.spread(aurocs)
            rel = float(np.mean(values.std(0, ddof=1) / np.maximum(np.abs(values.mean(0)), 1e-12)))
            rows.append(
                {
                    "samples": samples,
                    "draws": draws,
                    "item_relative_sd": rel,
                    "auroc_mean": over_seeds["mean"],
                    "auroc_sd": over_seeds["sd"],
                    "aurocs": aurocs,
                    "seconds": float(np.median(seconds)),
                }
            )
            print(
                f"S={samples:3d} {draws:10s} item sd/mean {rel:.3f}  AUROC {over_seeds['mean']:.3f} ± "
                f"{over_seeds['sd']:.3f}  {np.median(seconds):.1f} s",
                flush=True,
            )
    summary = {"ckpt": args.ckpt, "data": args.data, "n": len(items), "accuracy": float(1 - errors.mean()), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "z_draws.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# `latent_mi` across z draws ({len(items)} items of `{args.data}` the latent never trained on)",
        "",
        f"Command: `python experiments/z_draws.py {' '.join(sys.argv[1:] if argv is None else argv)}`; {args.repeats} noise seeds per row.",
        "",
        "| S | draws | per-item sd / mean across seeds | AUROC over seeds, mean ± sd | seconds per pass |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['samples']} | {r['draws']} | {r['item_relative_sd']:.3f} | {r['auroc_mean']:.3f} ± "
            f"{r['auroc_sd']:.3f} | {r['seconds']:.1f} |"
        )
    (out / "z_draws.md").write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    main()
