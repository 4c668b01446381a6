"""Tests of vtrans.evaluation.report: the results.json / scores.jsonl / report.md contracts and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vtrans.evaluation import report
from vtrans.evaluation.report import plots, prose, tables

NAMES = ["lens_ce", "msp", "entropy"]
N_ITEMS = 40
N_LAYERS = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strict_loads(text: str) -> Any:
    """json.loads that refuses NaN/Infinity tokens (which Python's json accepts by default)."""

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    """Two classes, three estimators of decreasing quality, lens curves of 5 layers."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(N_ITEMS):
        correct = bool(i % 2)
        error = 0 if correct else 1
        scores = {name: float(rng.normal() + error * (2 - k)) for k, name in enumerate(NAMES)}
        lens = np.linspace(8.0, 2.0 + 2.0 * error, N_LAYERS) + rng.normal(0, 0.3, N_LAYERS)
        out.append(
            {
                "idiom": f"idiom number {i}",
                "prompt": f"Complete the idiom: idiom number {i}",
                "target": "word",
                "completion": "word" if correct else "other",
                "correct": correct,
                "scores": scores,
                "lens_ce_by_layer": lens,  # a numpy array: the writers must convert it
            }
        )
    out[3]["scores"]["msp"] = float("nan")  # undefined for one item: dropped for msp only
    return out


@pytest.fixture
def results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    costs = {
        "lens_ce": {"cost_forward_equiv": 1.0, "seconds": 0.25},
        "msp": {"cost_forward_equiv": 1.0, "seconds": 0.1},
    }
    return report.build_results("tiny-gpt2", rows, costs, n_boot=200, reference="lens_ce", extra={"latent_accuracy": 0.5})


def test_build_results_schema(results: dict[str, Any]) -> None:
    assert set(results) == {
        "model",
        "n",
        "accuracy",
        "reference",
        "estimators",
        "paired_vs_reference",
        "correction",
        "latent_accuracy",
    }
    assert results["correction"] == {"method": "bonferroni", "comparisons": 2}
    assert results["model"] == "tiny-gpt2"
    assert results["n"] == N_ITEMS and type(results["n"]) is int
    assert results["accuracy"] == pytest.approx(0.5) and type(results["accuracy"]) is float
    assert results["reference"] == "lens_ce"
    assert list(results["estimators"]) == NAMES
    for entry in results["estimators"].values():
        assert list(entry) == [
            "auroc",
            "auroc_ci",
            "auprc",
            "prr",
            "aurc",
            "ece",
            "brier",
            "cost_forward_equiv",
            "seconds",
            "n",
        ]
        for key in ("auroc", "auprc", "prr", "aurc", "ece", "brier", "cost_forward_equiv", "seconds"):
            assert type(entry[key]) is float
        assert type(entry["n"]) is int
        assert isinstance(entry["auroc_ci"], list) and len(entry["auroc_ci"]) == 2
        assert all(type(x) is float for x in entry["auroc_ci"])
    assert set(results["paired_vs_reference"]) == {"msp", "entropy"}
    for entry in results["paired_vs_reference"].values():
        assert list(entry) == ["delta_auroc", "ci", "corrected_ci", "p_value"]
        assert type(entry["delta_auroc"]) is float and type(entry["p_value"]) is float
        assert len(entry["ci"]) == 2
        # the corrected interval (level 1 - 0.05/2, same resamples) holds the raw one
        assert entry["corrected_ci"][0] <= entry["ci"][0] <= entry["ci"][1] <= entry["corrected_ci"][1]


def test_build_results_values(results: dict[str, Any]) -> None:
    estimators = results["estimators"]
    assert estimators["lens_ce"]["n"] == N_ITEMS
    assert estimators["msp"]["n"] == N_ITEMS - 1
    assert estimators["lens_ce"]["auroc"] > estimators["entropy"]["auroc"]
    assert estimators["lens_ce"]["seconds"] == 0.25
    assert math.isnan(estimators["entropy"]["cost_forward_equiv"])  # not in costs
    assert results["paired_vs_reference"]["entropy"]["delta_auroc"] < 0


def test_the_reference_is_the_best_of_several_baselines(rows: list[dict[str, Any]]) -> None:
    out = report.build_results("m", rows, {}, n_boot=20, reference=("entropy", "msp", "not_scored"))
    best = max(("entropy", "msp"), key=lambda n: out["estimators"][n]["auroc"])
    assert out["reference"] == best and best not in out["paired_vs_reference"]
    assert {"entropy", "msp"} - {best} <= set(out["paired_vs_reference"])


def test_build_results_without_reference_scores(rows: list[dict[str, Any]]) -> None:
    out = report.build_results("m", rows, {}, n_boot=20, reference="latent_kl")
    assert out["paired_vs_reference"] == {}


def test_results_json_round_trips_with_nan_as_null(tmp_path: Path, results: dict[str, Any]) -> None:
    path = tmp_path / "results.json"
    report.write_results_json(path, results)
    text = path.read_text()
    assert "NaN" not in text and text.startswith("{\n  ")
    loaded = _strict_loads(text)
    assert loaded["estimators"]["entropy"]["cost_forward_equiv"] is None
    assert loaded["estimators"]["lens_ce"]["auroc"] == results["estimators"]["lens_ce"]["auroc"]
    assert loaded["paired_vs_reference"] == results["paired_vs_reference"]
    # a results file read back (null instead of NaN) still renders
    assert "entropy" in report.format_table(loaded)


def test_scores_jsonl_one_strict_object_per_line(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    rows[0]["scores"]["entropy"] = np.float32(1.5)
    rows[1]["lens_ce_by_layer"][2] = np.inf
    path = tmp_path / "scores.jsonl"
    report.write_scores_jsonl(path, rows)
    lines = path.read_text().splitlines()
    assert len(lines) == N_ITEMS
    items = [_strict_loads(line) for line in lines]
    assert set(items[0]) == {
        "idiom",
        "prompt",
        "target",
        "completion",
        "correct",
        "scores",
        "lens_ce_by_layer",
    }
    assert items[0]["correct"] is False and items[1]["correct"] is True
    assert items[0]["scores"]["entropy"] == 1.5
    assert items[3]["scores"]["msp"] is None
    assert items[1]["lens_ce_by_layer"][2] is None
    assert len(items[0]["lens_ce_by_layer"]) == N_LAYERS


def test_report_md_has_the_table_and_every_estimator(tmp_path: Path, results: dict[str, Any]) -> None:
    path = tmp_path / "report.md"
    report.write_report_md(path, results, ["roc.png", "histograms.png"])
    text = path.read_text()
    assert "tiny-gpt2" in text
    assert (
        "| estimator | n | AUROC [95% CI] | AUPRC | PRR | AURC | ECE | Brier | cost (fwd-equiv) | seconds "
        "| Δ AUROC vs lens_ce [95% CI] | corrected CI (Bonferroni, 2) |" in text
    )
    for name in NAMES:
        assert f"| {name} |" in text
    assert "(roc.png)" in text and "(histograms.png)" in text
    assert "`msp` (n=39)" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "estimator" not in line]
    aurocs = [float(line.split("|")[3].split()[0]) for line in table]
    assert all(line.split("|")[2].strip().isdigit() for line in table)  # each estimator's n
    assert aurocs == sorted(aurocs, reverse=True)


def test_format_table_is_aligned(results: dict[str, Any]) -> None:
    lines = report.format_table(results).splitlines()
    assert len(lines) == 2 + len(NAMES)
    assert lines[0].startswith("estimator") and "AUROC [95% CI]" in lines[0]
    assert "n/a" in report.format_table(results)  # the missing costs
    ends = {line.index("]") for line in lines[2:]}  # the AUROC CI column ends in the same place
    assert len(ends) == 1


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_all_writes_four_pngs(
    tmp_path: Path, rows: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    written = report.plot_all(tmp_path / "plots", rows, results)
    assert written == ["roc.png", "lens_by_layer.png", "histograms.png", "risk_coverage.png", "reliability.png"]
    for name in written:
        _assert_png(tmp_path / "plots" / name)


def test_plot_all_skips_the_lens_plot_without_lens_data(
    tmp_path: Path, rows: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    for i, row in enumerate(rows):
        if i % 2:
            del row["lens_ce_by_layer"]
        else:
            row["lens_ce_by_layer"] = None if i % 4 else []
    written = report.plot_all(tmp_path, rows, results)
    assert written == ["roc.png", "histograms.png", "risk_coverage.png", "reliability.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)


# --------------------------------------------------------------------------- plots that read well


def _drawn(fig):
    """The figure laid out as when saved; returns its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _lines(fig) -> dict[str, Any]:
    return {line.get_label().split()[0]: line for line in fig.axes[0].get_lines()}


@pytest.mark.parametrize("plot", ["_plot_roc", "_plot_risk_coverage"])
def test_curves_that_coincide_are_both_drawn_and_said_to(rows: list[dict[str, Any]], plot: str) -> None:
    for row in rows:  # the same ranking through a monotone map, as lens_ce = -log p is msp = 1 - p
        row["scores"]["twin"] = 3.0 * row["scores"]["msp"] + 1.0
    results = report.build_results("m", rows, {}, n_boot=100, reference=("msp",))
    fig = getattr(plots, plot)(rows, results, tables._by_auroc(results))
    lines = _lines(fig)
    msp, twin, entropy = lines["msp"], lines["twin"], lines["entropy"]
    assert np.array_equal(msp.get_xydata(), twin.get_xydata())  # one curve ...
    assert msp.get_linestyle() == "-" and twin.get_linestyle() == "--"  # ... drawn dashed over the other
    assert twin.get_zorder() > msp.get_zorder()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("twin (") and t.endswith(", same ranking as msp)") for t in legend)
    assert not any("same ranking" in t for t in legend if not t.startswith("twin"))
    assert entropy.get_linestyle() == "-"


def test_same_ranking_allows_rounding_and_nothing_more() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    order = np.argsort(a)
    swapped = a.copy()  # one pair of neighbours swapped, as float32 rounding does
    swapped[order[[100, 101]]] = swapped[order[[101, 100]]]
    assert plots._same_ranking(a, np.exp(a))
    assert plots._same_ranking(a, swapped)
    assert not plots._same_ranking(a, a + rng.normal(0, 0.3, a.size))  # a correlated, distinct score
    assert not plots._same_ranking(a, np.round(a, 1))  # a coarse version ties where a does not
    with_nan = a.copy()
    with_nan[0] = np.nan
    assert not plots._same_ranking(a, with_nan)  # not the same items


def test_the_lens_plot_keeps_the_layers_after_a_high_embedding_layer_readable(
    rows: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    """An embedding layer at ~110 nats and blocks from 30 down to 1 (SmolLM2's shape): the blocks'
    curves span most of the axis' height, not the bottom quarter a linear axis leaves them."""
    rng = np.random.default_rng(1)
    for row in rows:
        row["lens_ce_by_layer"] = np.array([110.0, *np.geomspace(30.0, 1.0, 8)]) * rng.uniform(0.9, 1.1)
    fig = plots._plot_lens_by_layer(rows, results, [])
    _drawn(fig)
    ax = fig.axes[0]
    to_axes = ax.transData + ax.transAxes.inverted()
    heights = [to_axes.transform(line.get_xydata())[1:, 1] for line in ax.get_lines()]  # layers >= 1
    span = max(h.max() for h in heights) - min(h.min() for h in heights)
    assert span > 0.5, span
    assert all(0 <= h.min() and h.max() <= 1 for h in heights)


def test_the_lens_plot_of_a_narrow_range_keeps_a_linear_axis_with_labels(
    rows: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    """A random model's ~10 nats at every layer: a log axis would label at most one tick."""
    for i, row in enumerate(rows):
        row["lens_ce_by_layer"] = list(10.0 + 0.01 * np.arange(N_LAYERS) + 0.001 * i)
    fig = plots._plot_lens_by_layer(rows, results, [])
    _drawn(fig)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    shown = [t for t, v in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True) if low <= v <= high]
    assert ax.get_yscale() == "linear" and len([t for t in shown if t.get_text()]) >= 3


def _labels_in_view(ax, axis: str) -> list:
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [t for t, v in zip(labels, ticks, strict=True) if low <= v <= high and t.get_text()]


def test_histogram_tick_labels_never_run_into_each_other(rows: list[dict[str, Any]]) -> None:
    """Scores of 1e-5 (mc_dropout_var), of 1e3 with a small spread, of 1e5: every panel's labels
    stand apart (seven-character labels like 0.00002 used to overprint)."""
    rng = np.random.default_rng(2)
    for row in rows:
        row["scores"].update(
            mc_dropout_var=float(rng.exponential(2e-5)),
            offset=float(1000 + rng.uniform(0, 0.01)),
            large=float(rng.exponential(1e5)),
        )
    results = report.build_results("m", rows, {}, n_boot=100)
    fig = plots._plot_histograms(rows, results, tables._by_auroc(results))
    renderer = _drawn(fig)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(results["estimators"])
    for ax in panels:
        for axis in ("x", "y"):
            boxes = [t.get_window_extent(renderer) for t in _labels_in_view(ax, axis)]
            assert len(boxes) >= 2, (ax.get_title(), axis)
            overlapping = any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
            assert not overlapping, (ax.get_title(), axis)


def test_the_prose_names_what_the_registry_declares(monkeypatch) -> None:
    """A family added to the registry is named in the report's bullets as it declares: among the
    references, the single-pass estimators, and with its fit."""
    from vtrans.estimators import registry
    from vtrans.estimators.base import Family, Fitted, Shown

    before = " ".join(prose._what_the_numbers_are().split())
    sequence = "the sequence-level scores (`sequence_nll`, `perplexity`, `max_token_nll`, `sequence_doubt`, "
    sequence += "`mean_token_entropy`, `rauq`)"
    assert f"of `msp`, `entropy`, `margin`, {sequence} and the sampled-word agreement" in before
    assert "the probe is the shared forward plus its fit" in before
    # a fitted family whose features take passes of their own is charged those
    assert "the probe with the latent's prediction is what its features cost plus its fit" in before
    cheap = Family("cheap", {"top2": "p(top-2)"}, lambda forward, context: {}, shown=Shown(reference=True))
    fitted = Family(
        "signed", {"signed_margin": "the margin, signed"}, None,
        fitted=Fitted("items", lambda features, errors: lambda other: other["margin"], ("margin",)),
        shown=Shown(prose={"cost": "the signed margin"}),
    )
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, cheap, fitted))
    after = " ".join(prose._what_the_numbers_are().split())
    assert f"of `msp`, `entropy`, `margin`, {sequence}, the sampled-word agreement" in after
    assert "and `top2`, the one" in after
    assert "`posterior_var`, `latent_kl`, `refit_prior_var`, `top2`) share one forward" in after
    assert "plus its fit; the signed margin is the shared forward plus its fit." in after


def test_every_row_gets_a_cross_fitted_p_wrong_from_the_recommended_estimator(rows: list[dict[str, Any]]) -> None:
    """Higher adapter_nll, higher p_wrong within a fold (one Platt fit is monotone); a row's
    probability does not move when its own label flips; a run without adapter_nll gets None."""
    rng = np.random.default_rng(1)
    for row in rows:
        row["scores"]["adapter_nll"] = float(rng.normal() + 2.0 * (not row["correct"]))
    out = report.with_p_wrong(rows)
    assert all(0 < r["p_wrong"] < 1 for r in out) and "p_wrong" not in rows[0]  # the rows given are left as they were
    folds = report.results.calibration_folds(rows)
    inside = [r for r, f in zip(out, folds, strict=True) if f == folds[0]]
    ordered = sorted(inside, key=lambda r: r["scores"]["adapter_nll"])
    assert [r["p_wrong"] for r in ordered] == sorted(r["p_wrong"] for r in ordered)
    flipped = [dict(r) for r in rows]
    flipped[0]["correct"] = not flipped[0]["correct"]
    assert report.with_p_wrong(flipped)[0]["p_wrong"] == out[0]["p_wrong"]
    for row in rows:
        del row["scores"]["adapter_nll"]
    assert all(r["p_wrong"] is None for r in report.with_p_wrong(rows))


def test_the_prose_names_the_families_of_the_run_only() -> None:
    """A report says what its own run compared: the references and costs of the families that ran."""
    text = " ".join(prose._what_the_numbers_are(["msp", "entropy", "sample_disagreement", "latent_nll"]).split())
    assert "of `msp`, `entropy` and the sampled-word agreement" in text
    assert "sequence_nll" not in text and "margin" not in text and "MC dropout" not in text
    assert "The single-pass estimators (`msp`, `entropy`) share one forward" in text
    assert "share one forward, and each is charged that whole forward with every read off it;" in text
    assert "are charged it plus their own passes" in text and "`latent_nll`" in text  # the extra passes that ran
    alone = " ".join(prose._what_the_numbers_are(["posterior_var"]).split())
    assert "no cheap baseline ran" in alone and "Training the latents is not in the cost." in alone
