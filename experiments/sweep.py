"""Search for a latent that tells wrong completions apart: priors, injection layers, sizes, β, free bits.

Everything that does not depend on the latent is computed once: the base model's completions
and labels on the evaluated split, the reference estimators (``lens_ce``, ``msp``), and, per
injection layer, the frozen backbone's per-item states for training (``vtrans.frozen``). Each
variant then trains only its latent and scores the evaluated items with the latent estimators.

    python experiments/sweep.py --out docs/sweep           # the built-in grid on SmolLM2
    python experiments/sweep.py --model tiny-gpt2 --epochs 1 --max-variants 2 --out /tmp/sweep

Writes ``OUT/sweep.json`` and ``OUT/sweep.md`` (a table sorted by the best latent AUROC).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from vtrans import metrics
from vtrans.backbones import Backbone
from vtrans.data import IdiomDataModule, load_split
from vtrans.estimators import latent as latent_estimators
from vtrans.evaluate import EvalConfig, Harness
from vtrans.frozen import FrozenCache
from vtrans.module import LatentLM

LATENT = ("posterior_var", "latent_mi", "latent_kl")
REFERENCE = ("lens_ce", "msp", "entropy", "lens_area")


def grid(n_layers: int) -> list[dict]:
    """The variants: both priors, three injection layers, two sizes, β and free bits."""
    mid = n_layers // 2
    base = dict(prior="conditional", layer=mid, d_z=16, beta=1.0, free_bits=0.1)
    variants = [
        base,
        {**base, "prior": "standard"},
        {**base, "prior": "standard", "free_bits": 0.5},
        {**base, "layer": max(1, n_layers // 4)},
        {**base, "layer": min(n_layers - 1, 3 * n_layers // 4)},
        {**base, "d_z": 64},
        {**base, "beta": 0.2},
        {**base, "free_bits": 0.0},
        {**base, "free_bits": 0.5},
    ]
    return variants


def train_variant(backbone, caches: dict, hp: dict, epochs: int, seed: int, log_dir: Path) -> tuple[LatentLM, dict]:
    L.seed_everything(seed, workers=True)
    module = LatentLM(backbone, hidden=256, kl_warmup_steps=50, lr=2e-3, **hp)
    module.frozen_cache = caches.setdefault(module.layer, FrozenCache())  # shared by variants of one layer
    data = IdiomDataModule(data="builtin", batch_size=32, seed=0)
    logger = L.pytorch.loggers.CSVLogger(log_dir, name="sweep")
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return module.eval(), logged


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-variants", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    backbone = Backbone(args.model, attn_implementation="sdpa")
    config = EvalConfig(data="builtin", split=args.split, samples=args.samples, n_boot=args.n_boot)
    items = load_split("builtin", args.split)
    base = Harness(backbone, None, config, progress=False)
    reference = base.score(items, list(REFERENCE))
    errors = torch.tensor([not c for c in reference.correct], dtype=torch.long)
    print(f"{len(items)} items, accuracy {1 - errors.float().mean():.3f}", flush=True)
    rows = {name: metrics.summarize(reference.scores[name], errors, args.n_boot, args.seed) for name in REFERENCE}

    caches: dict[int, FrozenCache] = {}
    results = []
    variants = grid(backbone.n_layers)[: args.max_variants]
    for i, hp in enumerate(variants):
        start = time.perf_counter()
        module, logged = train_variant(backbone, caches, hp, args.epochs, args.seed, out / "logs")
        harness = Harness(backbone, module, config, progress=False)
        scores: dict[str, list[torch.Tensor]] = {}
        for _, enc in harness._encoded_batches(reference.prompts, reference.completions):
            for key, value in latent_estimators.scores(module, enc, args.samples, args.seed).items():
                scores.setdefault(key, []).append(value.float().cpu())
        entry = {"variant": hp, "val": logged, "seconds": time.perf_counter() - start, "estimators": {}}
        for name, parts in scores.items():
            s = torch.cat(parts)
            summary = metrics.summarize(s, errors, args.n_boot, args.seed)
            summary["vs_lens_ce"] = metrics.paired_bootstrap(
                metrics.auroc, s, reference.scores["lens_ce"], errors, args.n_boot, args.seed
            )
            entry["estimators"][name] = summary
        results.append(entry)
        best = max(entry["estimators"].items(), key=lambda kv: _nan_low(kv[1]["auroc"]))
        print(
            f"[{i + 1}/{len(variants)}] {hp} -> best {best[0]} AUROC {best[1]['auroc']:.3f} "
            f"(val KL {logged.get('val/kl_item', float('nan')):.2f}, active {logged.get('val/active_units', 0):.0f}) "
            f"in {entry['seconds']:.0f}s",
            flush=True,
        )
    summary = {
        "model": args.model,
        "n": len(items),
        "accuracy": float(1 - errors.float().mean()),
        "epochs": args.epochs,
        "reference": rows,
        "variants": results,
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "sweep.md").write_text(markdown(summary, " ".join(["python experiments/sweep.py", *(argv or [])])))
    print((out / "sweep.md").read_text())
    return summary


def _nan_low(x: float) -> float:
    return -1.0 if x != x else x


def markdown(summary: dict, command: str) -> str:
    lines = [
        f"# Latent sweep on {summary['model']} ({summary['n']} test idioms, accuracy {summary['accuracy']:.3f})",
        "",
        f"Command: `{command}` ({summary['epochs']} epochs per variant).",
        "",
        "Reference estimators (no latent):",
        "",
        "| estimator | AUROC [95% CI] |",
        "|---|---|",
    ]
    for name, r in summary["reference"].items():
        lines.append(f"| `{name}` | {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}] |")
    lines += [
        "",
        "| prior | layer | d_z | β | free bits | val KL/item | active units | "
        + " | ".join(f"`{n}` AUROC [95% CI]" for n in LATENT)
        + " | best Δ vs `lens_ce` [95% CI] |",
        "|---|---|---|---|---|---|---|" + "---|" * len(LATENT) + "---|",
    ]
    order = sorted(
        summary["variants"],
        key=lambda e: -max(_nan_low(v["auroc"]) for v in e["estimators"].values()),
    )
    for e in order:
        v, val = e["variant"], e["val"]
        cells = []
        for name in LATENT:
            r = e["estimators"].get(name)
            cells.append("—" if r is None else f"{r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}]")
        best_name, best = max(e["estimators"].items(), key=lambda kv: _nan_low(kv[1]["auroc"]))
        d = best["vs_lens_ce"]
        lines.append(
            f"| {v['prior']} | {v['layer']} | {v['d_z']} | {v['beta']} | {v['free_bits']} | "
            f"{val.get('val/kl_item', float('nan')):.2f} | {val.get('val/active_units', float('nan')):.0f} | "
            + " | ".join(cells)
            + f" | `{best_name}` {d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
