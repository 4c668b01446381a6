"""The files of the contract and the statistics they hold: results.json, scores.jsonl, :func:`build_results`.

The file formats are the contracts of ``docs/design.md``. JSON is always strict: NaN and
infinities are written as ``null``; functions that read results back (the table and the report)
treat ``null`` as "not available".
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vtrans.estimators import registry
from vtrans.evaluation import metrics
from vtrans.evaluation.metrics import calibration as calibration_metrics
from vtrans.latent.calibration import RECOMMENDED, Calibration


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch values to plain Python, with non-finite floats as None."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays/scalars, torch tensors
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def item_row(
    item: Any,
    prompt: str,
    completion: Any,
    correct: bool,
    scores: dict[str, float],
    fields: dict[str, list[float]],
    fold: int | None = None,
    scores_by_seed: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """One item's row of scores.jsonl.

    Args:
        item: the idiom (a ``vtrans.data.IdiomItem``).
        prompt: its prompt.
        completion: the base model's completion of it (a ``vtrans.backbone.generate.Completion``).
        correct: whether the completion word is the idiom's last word.
        scores: ``{NAME: float}``, the estimators' scores (the first seed's in a cross-fitted run).
        fields: the per-item fields the families write besides their scores
            (``Family.fields``: ``lens_ce_by_layer``, ...), in order.
        fold: the item's fold in a cross-fitted run.
        scores_by_seed: ``{SEED: {NAME: float}}``, the other seeds' scores in a cross-fitted run.
    """
    row: dict[str, Any] = {
        "idiom": item.idiom,
        "prompt": prompt,
        "target": item.target,
        "completion": completion.text.strip(),
        "completion_word": completion.word,
        "correct": bool(correct),
    }
    if fold is not None:
        row["fold"] = fold
    row["scores"] = scores
    if scores_by_seed is not None:
        row["scores_by_seed"] = scores_by_seed
    row.update(fields)
    return row


def write_scores_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per item.

    Args:
        path: output file.
        rows: items as in the contract: ``{"idiom", "prompt", "target",
            "completion", "correct", "scores": {NAME: float},
            "lens_ce_by_layer": [float, ...]}``; written key for key.
    """
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_jsonable(row), allow_nan=False, ensure_ascii=False) + "\n")


def write_results_json(path: str | Path, results: dict[str, Any]) -> None:
    """Write the results dictionary (see :func:`build_results`) as indented JSON.

    Args:
        path: output file.
        results: the results; NaN becomes ``null``.
    """
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False, ensure_ascii=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def _estimator_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Estimator names found in ``rows[*]["scores"]``, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("scores", {})))
    return list(names)


def _errors(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """(n,) 0/1 array, 1 = incorrect completion."""
    return np.array([not row["correct"] for row in rows], dtype=np.int64)


def _score_column(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray:
    """(n,) scores of one estimator; NaN where the item has none (missing or null)."""
    values = [row.get("scores", {}).get(name) for row in rows]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _float(x: Any) -> float:
    """``x`` as a float, NaN for None (JSON null)."""
    return float("nan") if x is None else float(x)


CALIBRATION_FOLDS = 5


def calibration_folds(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The folds of the cross-fitted calibration: a cross-fitted run's own folds, else
    :data:`CALIBRATION_FOLDS` folds by a hash of the idiom (stable across runs and machines)."""
    folds = [row.get("fold") for row in rows]
    if None not in folds and len(set(folds)) > 1:
        return np.array(folds)
    return np.array([zlib.crc32(str(row.get("idiom", row.get("prompt", ""))).encode()) % CALIBRATION_FOLDS for row in rows])


def with_p_wrong(rows: Sequence[dict[str, Any]], calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """The rows, each with ``p_wrong``: the probability that its completion is wrong, from the
    recommended estimator (``vtrans.latent.calibration.RECOMMENDED``, the one the confirmatory
    run supports). With ``calibration`` (the one the evaluated latent carries, fitted on its
    validation split) it is that map's; else Platt scaling cross-fitted over
    :func:`calibration_folds`, so that no row's probability read its own label. None where the
    run did not score it, or its fold could not be fitted."""
    column = _score_column(rows, RECOMMENDED if calibration is None else calibration.estimator)
    p = np.full(len(rows), np.nan)
    keep = ~np.isnan(column)
    if keep.any():
        if calibration is not None:
            p[keep] = calibration(column[keep])
        else:
            p[keep] = calibration_metrics.cross_fitted(column[keep], _errors(rows)[keep], calibration_folds(rows)[keep])
    return [{**row, "p_wrong": None if np.isnan(v) else float(v)} for row, v in zip(rows, p, strict=True)]


def p_wrong_record(rows: Sequence[dict[str, Any]], calibration: Calibration | None = None) -> dict[str, Any]:
    """What results.json says of the rows' ``p_wrong`` (:func:`with_p_wrong`): where it came from,
    on how many items, and its ECE and Brier score on them: for a latent's own calibration, a
    test on items it was not fitted on."""
    p = np.array([np.nan if row.get("p_wrong") is None else row["p_wrong"] for row in rows], dtype=np.float64)
    errors = _errors(rows)
    source = calibration.describe() if calibration is not None else f"Platt scaling of {RECOMMENDED} cross-fitted over the items' folds"
    return {
        "from": source,
        "calibration": None if calibration is None else calibration.to_dict(),
        "n": int((~np.isnan(p)).sum()),
        "ece": calibration_metrics.ece(p, errors),
        "brier": calibration_metrics.brier(p, errors),
    }


def _estimator_entry(
    scores: np.ndarray, errors: np.ndarray, cost: dict[str, float], n_boot: int, seed: int, folds: np.ndarray
) -> dict[str, Any]:
    """Metrics, cost and item count of one estimator, NaN-scored items dropped; ``ece`` and
    ``brier`` are of its cross-fitted Platt probabilities (``metrics.calibration``)."""
    folds = folds[~np.isnan(scores)]
    scores, errors = metrics.scored(scores, errors)
    entry = metrics.summarize(scores, errors, n_boot=n_boot, seed=seed)
    p_wrong = calibration_metrics.cross_fitted(scores, errors, folds)
    entry["ece"], entry["brier"] = calibration_metrics.ece(p_wrong, errors), calibration_metrics.brier(p_wrong, errors)
    entry["cost_forward_equiv"] = _float(cost.get("cost_forward_equiv"))
    entry["seconds"] = _float(cost.get("seconds"))
    entry["n"] = int(scores.size)
    return entry


def _paired_entry(
    scores: np.ndarray, reference: np.ndarray, errors: np.ndarray, n_boot: int, seed: int, compared: int
) -> dict[str, Any]:
    """Paired-bootstrap AUROC difference (estimator - reference) on items both scored, with its
    raw 95% interval and the interval Bonferroni-corrected over the ``compared`` comparisons
    (level 1 - 0.05/compared, on the same resamples)."""
    keep = ~np.isnan(scores) & ~np.isnan(reference)
    both = (metrics.auroc, scores[keep], reference[keep], errors[keep])
    paired = metrics.paired_bootstrap(*both, n_boot=n_boot, seed=seed, comparisons=compared)
    return {"delta_auroc": paired["delta"], "ci": paired["ci"], "corrected_ci": paired["corrected_ci"], "p_value": paired["p_value"]}


def build_results(
    model: str,
    rows: list[dict[str, Any]],
    costs: dict[str, dict[str, float]],
    n_boot: int = 1000,
    seed: int = 0,
    reference: str | Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    random_weights: bool = False,
) -> dict[str, Any]:
    """Compute every estimator's metrics and its AUROC difference to the reference.

    Args:
        model: model name for the report (``Backbone.label``: it says "random weights" where they are).
        rows: items as in scores.jsonl (``correct`` and ``scores`` are used).
        costs: ``{NAME: {"cost_forward_equiv": float, "seconds": float}}``;
            estimators missing here get NaN costs.
        n_boot: bootstrap resamples for the confidence intervals.
        seed: bootstrap seed.
        reference: estimator that the others are compared with (paired bootstrap); given
            several, the one of them with the highest AUROC here (the best baseline); None:
            the best of the registry's references (``registry.reference_of``).
        extra: more top-level keys to add (e.g. the latent model's accuracy).
        random_weights: the base model's weights are random (``random:NAME``): the results say so
            (``"random_weights": true``) and that the accuracy is not a result
            (``"accuracy_is_a_result": false``); the reports write it in place of the accuracy.

    Returns:
        ``{"model", "n", "accuracy", "reference", "estimators": {NAME: {"auroc",
        "auroc_ci", "auprc", "prr", "aurc", "ece", "brier", "cost_forward_equiv",
        "seconds", "n"}}, "paired_vs_reference": {NAME: {"delta_auroc", "ci", "corrected_ci", "p_value"}},
        "correction": {"method": "bonferroni", "comparisons": m}, **extra}``, where
        ``corrected_ci`` is Bonferroni-corrected over the m estimators compared with the
        reference. Items with a NaN score are dropped for that estimator only
        (its ``n`` says how many remain). ``paired_vs_reference`` leaves out the
        reference itself and is empty when no item has a reference score.
    """
    errors = _errors(rows)
    scores = {name: _score_column(rows, name) for name in _estimator_names(rows)}
    folds = calibration_folds(rows)
    estimators = {
        name: _estimator_entry(column, errors, costs.get(name, {}), n_boot, seed, folds)
        for name, column in scores.items()
    }
    if not isinstance(reference, str):
        reference = registry.reference_of({name: entry["auroc"] for name, entry in estimators.items()}, reference)
    paired = {}
    compared = len(scores) - 1
    if reference in scores:
        paired = {
            name: _paired_entry(column, scores[reference], errors, n_boot, seed, compared)
            for name, column in scores.items()
            if name != reference
        }
    results: dict[str, Any] = {
        "model": model,
        "n": len(rows),
        "accuracy": float(1 - errors.mean()) if len(rows) else float("nan"),
        "reference": reference,
        "estimators": estimators,
        "paired_vs_reference": paired,
        "correction": {"method": "bonferroni", "comparisons": compared},
    }
    if random_weights:
        results.update(random_weights=True, accuracy_is_a_result=False)
    results.update(extra or {})
    return results
