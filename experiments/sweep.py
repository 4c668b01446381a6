"""Search for a latent that tells wrong completions apart: priors, injection layers, sizes, β, free bits.

Everything that does not depend on the latent is computed once: the base model's completions
and labels on the validation and test splits, the reference estimators (``lens_ce``, ``msp``), and, per
injection layer, the frozen backbone's per-item states for training (``vtrans.backbone.frozen``). Each
variant then trains only its latent and scores the evaluated items with the latent estimators.

    python experiments/sweep.py --out docs/sweep           # the built-in grid on SmolLM2
    python experiments/sweep.py --model tiny-gpt2 --epochs 1 --max-variants 2 --out /tmp/sweep

Every variant is trained as ``train.py fit --config CONFIG`` would train it (``--config``, by
default ``configs/smollm2.yaml``: its trainer, data and latent settings; :func:`vtrans.latent.training.build`)
with the variant's latent settings, ``--epochs`` and ``--seed`` in place of the config's, a CSV log
under ``OUT/logs`` and no checkpoints.

The setting and the estimator are chosen by validation AUROC (the latents train on the train
split); the test split is scored once, for the chosen one. Writes ``OUT/sweep.json`` and
``OUT/sweep.md`` (the validation table, sorted by the best latent AUROC, and the chosen test figure).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vtrans.backbone.frozen import FrozenCache
from vtrans.backbone.loading import Backbone
from vtrans.config import EvalConfig
from vtrans.data import load_split
from vtrans.estimators.runner import Runner
from vtrans.evaluation import metrics
from vtrans.evaluation.scored import score_items
from vtrans.latent import training
from vtrans.latent.model import LatentModel

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"

LATENT = ("posterior_var", "latent_mi", "latent_kl")
REFERENCE = ("lens_ce", "msp", "entropy", "lens_area")
CHEAP = ("msp", "entropy")


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


def train_variant(
    config: Path, backbone: Backbone, caches: dict, hp: dict, epochs: int, seed: int, log_dir: Path
) -> tuple[LatentModel, dict]:
    """The latent of one variant, trained from ``config`` with the variant's settings, and its last validation metrics."""
    overrides = {
        "seed_everything": seed,
        "model.backbone.init_args.name": backbone.name,
        **{f"model.{key}": value for key, value in hp.items()},
        "trainer.max_epochs": epochs,
        "trainer.logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(log_dir), "name": "sweep"},
        },
        "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.num_sanity_val_steps": 0,
    }
    frozen = caches.setdefault(hp["layer"], FrozenCache())  # shared by the variants of one layer
    built = training.build(config, overrides, backbone=backbone, frozen=frozen)
    training.fit(built)
    logged = {k: float(v) for k, v in built.trainer.callback_metrics.items() if k.startswith("val/")}
    return built.module.model.eval(), logged


def _latent_summaries(backbone, module, config, scored, errors, n_boot, seed) -> dict:
    """Each latent estimator's metrics on the items of ``scored`` (completions already made)."""
    runner = Runner(backbone, module, config, progress=False)
    scores = runner.scores(scored.prompts, scored.completions, list(LATENT))
    return {name: (s, metrics.summarize(s, errors, n_boot, seed)) for name, s in scores.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the training YAML every variant starts from")
    parser.add_argument("--model", default=None, help="the backbone (default: the config's)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-variants", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    backbone_spec = training.read_training_config(args.config).backbone
    backbone = Backbone(**{**backbone_spec, "name": args.model or backbone_spec["name"]})
    config = EvalConfig(data="builtin", samples=args.samples, n_boot=args.n_boot, seed=args.seed)
    base = Runner(backbone, None, config, progress=False)
    splits = {}
    for split in ("val", "test"):
        scored = score_items(base, load_split("builtin", split), list(REFERENCE), config.template)
        errors = torch.tensor([not c for c in scored.correct], dtype=torch.long)
        splits[split] = (scored, errors)
        print(f"{split}: {len(scored.items)} items, accuracy {1 - errors.float().mean():.3f}", flush=True)
    val, val_errors = splits["val"]
    reference = {name: metrics.summarize(val.scores[name], val_errors, args.n_boot, args.seed) for name in REFERENCE}

    caches: dict[int, FrozenCache] = {}
    results, modules = [], []
    variants = grid(backbone.n_layers)[: args.max_variants]
    for i, hp in enumerate(variants):
        start = time.perf_counter()
        module, logged = train_variant(args.config, backbone, caches, hp, args.epochs, args.seed, out / "logs")
        summaries = _latent_summaries(backbone, module, config, val, val_errors, args.n_boot, args.seed)
        entry = {
            "variant": hp,
            "val": logged,
            "seconds": time.perf_counter() - start,
            "estimators": {name: summary for name, (_, summary) in summaries.items()},
        }
        results.append(entry)
        modules.append(module)
        best = max(entry["estimators"].items(), key=lambda kv: _nan_low(kv[1]["auroc"]))
        print(
            f"[{i + 1}/{len(variants)}] {hp} -> best on val {best[0]} AUROC {best[1]['auroc']:.3f} "
            f"(val KL {logged.get('val/kl', float('nan')):.2f}, active {logged.get('val/active_units', 0):.0f}) "
            f"in {entry['seconds']:.0f}s",
            flush=True,
        )
    # the choice: the (variant, estimator) with the best validation AUROC; its test figure, once
    chosen_i, chosen_name = max(
        ((i, name) for i, e in enumerate(results) for name in e["estimators"]),
        key=lambda pair: _nan_low(results[pair[0]]["estimators"][pair[1]]["auroc"]),
    )
    test, test_errors = splits["test"]
    test_scores = _latent_summaries(backbone, modules[chosen_i], config, test, test_errors, args.n_boot, args.seed)
    chosen_scores, chosen_summary = test_scores[chosen_name]
    cheap = max(CHEAP, key=lambda n: _nan_low(metrics.auroc(test.scores[n], test_errors)))
    chosen_summary["vs_best_cheap"] = {
        "baseline": cheap,
        "baseline_auroc": metrics.auroc(test.scores[cheap], test_errors),
        **metrics.paired_bootstrap(metrics.auroc, chosen_scores, test.scores[cheap], test_errors, args.n_boot, args.seed),
    }
    summary = {
        "model": backbone.name,
        "training_config": str(args.config),
        "selected_on": "val",
        "n_val": len(val.items),
        "n_test": len(test.items),
        "accuracy_val": float(1 - val_errors.float().mean()),
        "accuracy_test": float(1 - test_errors.float().mean()),
        "epochs": args.epochs,
        "reference_val": reference,
        "variants": results,
        "chosen": {"variant": results[chosen_i]["variant"], "estimator": chosen_name, "test": chosen_summary},
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "sweep.md").write_text(markdown(summary, " ".join(["python experiments/sweep.py", *(argv or [])])))
    print((out / "sweep.md").read_text())
    return summary


def _nan_low(x: float) -> float:
    return -1.0 if x != x else x


def _ci(r: dict) -> str:
    return f"{r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}]"


def markdown(summary: dict, command: str) -> str:
    chosen = summary["chosen"]
    v, t = chosen["variant"], chosen["test"]
    d = t["vs_best_cheap"]
    lines = [
        f"# Latent sweep on {summary['model']}: chosen on validation, tested once",
        "",
        f"Command: `{command}` ({summary['epochs']} epochs per variant). Every latent trains on the built-in "
        f"train split. **Every figure in the table is on the validation split** ({summary['n_val']} idioms, "
        f"accuracy {summary['accuracy_val']:.3f}), and the setting and estimator with the best validation AUROC "
        f"are chosen there. The test split ({summary['n_test']} idioms) is read once, for the chosen one only.",
        "",
        f"**Chosen:** {v['prior']} prior, layer {v['layer']}, d_z {v['d_z']}, β {v['beta']}, free bits "
        f"{v['free_bits']}, estimator `{chosen['estimator']}`. **Test AUROC {_ci(t)}**; paired against the best "
        f"cheap baseline on test (`{d['baseline']}`, {d['baseline_auroc']:.3f}): "
        f"Δ {d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}].",
        "",
        "Reference estimators on the validation split (no latent):",
        "",
        "| estimator | val AUROC [95% CI] |",
        "|---|---|",
    ]
    for name, r in summary["reference_val"].items():
        lines.append(f"| `{name}` | {_ci(r)} |")
    lines += [
        "",
        "| prior | layer | d_z | β | free bits | val KL/item | active units | "
        + " | ".join(f"`{n}` val AUROC [95% CI]" for n in LATENT)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(LATENT),
    ]
    order = sorted(
        summary["variants"],
        key=lambda e: -max(_nan_low(v["auroc"]) for v in e["estimators"].values()),
    )
    for e in order:
        v, val = e["variant"], e["val"]
        cells = ["—" if e["estimators"].get(name) is None else _ci(e["estimators"][name]) for name in LATENT]
        lines.append(
            f"| {v['prior']} | {v['layer']} | {v['d_z']} | {v['beta']} | {v['free_bits']} | "
            f"{val.get('val/kl', float('nan')):.2f} | {val.get('val/active_units', float('nan')):.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
