"""The results of a cross-fitted run: every seed's scores of every item, assembled into its files.

The reference is the best cheap baseline by its AUROC averaged over seeds; each estimator's
entry adds its AUROC under every seed and their spread, and each paired difference its spread
over seeds (``vtrans.evaluation.metrics.spread``). scores.jsonl's rows carry the first seed's
scores, the other seeds' (``scores_by_seed``) and the item's fold. The files are written as
a comparative run's are (``vtrans.evaluation.report``), with the seed forest and report.md of a
cross-fitted run.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch

from vtrans.estimators import registry
from vtrans.evaluation import metrics, report
from vtrans.evaluation.scored import costs

if TYPE_CHECKING:
    from vtrans.backbone.generate import Completion
    from vtrans.backbone.loading import Backbone
    from vtrans.config import CrossvalConfig, EvalConfig
    from vtrans.evaluation.folds import FoldLatents, FoldPlan


class Labels(NamedTuple):
    """The scored items' prompts, the base model's completions of them, and whether each is correct."""

    prompts: list[str]
    completions: list[Completion]
    correct: list[bool]


class Run(Protocol):
    """What the results read of a cross-fitted run (``vtrans.evaluation.crossval.CrossFit``)."""

    cfg: CrossvalConfig
    eval: EvalConfig
    plan: FoldPlan
    latents: FoldLatents
    backbone: Backbone


def assemble(fit: Run, names, by_seed, labels: Labels, fields: dict[str, torch.Tensor], seconds):
    """results.json's content and scores.jsonl's rows, from every seed's scores of every item and
    the per-item fields (seed-free)."""
    cfg, plan, spec = fit.cfg, fit.plan, fit.latents.spec
    errors = np.array([0.0 if c else 1.0 for c in labels.correct])
    first = cfg.seeds[0]
    cost = costs(seconds, names)
    per_seed = {
        seed: {nm: by_seed[seed][nm].double().numpy() for nm in names if nm in by_seed[seed]} for seed in cfg.seeds
    }
    aurocs = {nm: [metrics.auroc(*metrics.scored(per_seed[s][nm], errors)) for s in cfg.seeds] for nm in names}
    reference = registry.reference_of({nm: metrics.spread(aurocs[nm])["mean"] for nm in names})  # mean over seeds
    rows = [
        report.item_row(
            item,
            labels.prompts[i],
            labels.completions[i],
            labels.correct[i],
            {nm: float(per_seed[first][nm][i]) for nm in names},
            {key: registry.per_item(key, value[i]) for key, value in fields.items()},
            fold=plan.folds[i],
            scores_by_seed={str(s): {nm: float(per_seed[s][nm][i]) for nm in names} for s in cfg.seeds[1:]},
        )
        for i, item in enumerate(plan.items)
    ]
    protocol = {
        "kind": "cross-fitted",
        "folds": cfg.folds,
        "seeds": cfg.seeds,
        "fold_seed": cfg.fold_seed,
        "training_config": cfg.config,
        "data": plan.data,
        "extra_train": cfg.extra_train,
        "n_extra_train": len(plan.extra),
        "n_extra_dropped": plan.n_extra_dropped,
        "from_checkpoints": cfg.from_checkpoints,
        "self_targets": cfg.self_targets,
        "ensemble": cfg.ensemble,
        "epochs": cfg.epochs or spec.max_epochs,
        "latent": spec.model,
        "backbone": spec.backbone,
    }
    extra = {"protocol": protocol, "config": asdict(fit.eval), "seconds": seconds}
    results = report.build_results(
        fit.backbone.label, rows, cost, n_boot=fit.eval.n_boot, seed=0, reference=reference, extra=extra,
        random_weights=fit.backbone.random_weights,
    )
    for nm in names:
        values = np.array(aurocs[nm], dtype=float)
        results["estimators"][nm]["seeds"] = {"auroc": values.tolist(), **metrics.spread(values)}
        if nm != reference and nm in results["paired_vs_reference"]:
            deltas = values - np.array(aurocs[reference])
            results["paired_vs_reference"][nm]["seeds"] = {"delta": deltas.tolist(), **metrics.spread(deltas)}
    return results, rows


def write(out: Path, results: dict, rows: list[dict], markdown: str | Path | None) -> None:
    """scores.jsonl, results.json, the plots and report.md (also at ``markdown``, its images linked relative to it)."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_scores_jsonl(out / "scores.jsonl", report.with_p_wrong(rows))
    report.write_results_json(out / "results.json", results)
    plots = report.plot_all(out, rows, results)
    plots += report.plot_seed_forest(out, results)
    md = Path(markdown) if markdown else out / "report.md"
    report.write_crossval_md(md, results, [os.path.relpath(out / p, md.parent) for p in plots])
    if md != out / "report.md":
        report.write_crossval_md(out / "report.md", results, plots)
