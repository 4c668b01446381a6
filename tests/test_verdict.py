"""``experiments/verdict.py``: runs paired item by item, the Δ against msp and latent_nll, refused mismatches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "verdict.py"


def load():
    spec = importlib.util.spec_from_file_location("verdict", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, errors: np.ndarray, seeds: list[int], scores: dict[int, dict[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True)
    names = list(scores[seeds[0]])
    rows = []
    for i, e in enumerate(errors):
        rows.append({
            "idiom": f"idiom {i}", "correct": bool(e == 0),
            "scores": {nm: float(scores[seeds[0]][nm][i]) for nm in names},
            "scores_by_seed": {str(s): {nm: float(scores[s][nm][i]) for nm in names} for s in seeds[1:]},
        })
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"protocol": {"seeds": seeds}, "estimators": {nm: {"cost_forward_equiv": 1.0} for nm in names}}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_pairs_runs_item_by_item_and_writes_the_table_and_figure(tmp_path):
    verdict = load()
    gen = np.random.default_rng(0)
    errors = (gen.random(60) < 0.5).astype(float)
    noise = {s: gen.normal(size=60) for s in (0, 1)}
    latent = write_run(tmp_path / "latent", errors, [0, 1], {
        s: {"msp": errors + 2.0 * noise[0], "latent_nll": errors + 0.5 * noise[s], "posterior_var": noise[s]} for s in (0, 1)
    })
    twin = write_run(tmp_path / "twin", errors, [0, 1], {
        s: {"msp": errors + 2.0 * noise[0], "adapter_nll": errors + 0.5 * noise[s]} for s in (0, 1)
    })
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    verdict.main(["--run", str(latent), "--run", str(twin), "--out", str(tmp_path / "out"), "--n-boot", "200",
                  "--markdown", str(page), "--transfer", str(latent)])
    records = {r["estimator"]: r for r in json.loads((tmp_path / "out" / "verdict.json").read_text())}
    assert set(records) == {"msp", "latent_nll", "posterior_var", "adapter_nll"}  # msp read once, from the first run
    assert records["msp"]["vs_msp"] is None and records["latent_nll"]["vs_latent_nll"] is None
    # the twin's score equals the latent's seed by seed: Δ exactly 0 on every seed
    assert records["adapter_nll"]["vs_latent_nll"]["seeds"] == [0.0, 0.0]
    assert records["latent_nll"]["vs_msp"]["delta"] > 0.1  # less noise than msp: clearly ahead
    for name in ("latent_nll", "posterior_var", "adapter_nll"):  # corrected over the table's 3 comparisons: wider
        d = records[name]["vs_msp"]
        assert d["corrected_ci"][0] <= d["ci"][0] <= d["ci"][1] <= d["corrected_ci"][1], name
    assert "Bonferroni-corrected for the 3 comparisons" in page.read_text()
    assert records["posterior_var"]["kind"] == "spread" and records["latent_nll"]["kind"] == "mean"
    assert (tmp_path / "out" / "mean_vs_spread.png").stat().st_size > 10_000
    assert "| `adapter_nll` | mean | twin | 2 |" in (tmp_path / "out" / "verdict.md").read_text()
    text = page.read_text()
    assert "](../out/mean_vs_spread.png)" in text  # linked relative to the page
    table = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `")]
    assert table.index("| `posterior_var`") == 3  # highest mean AUROC first: pure noise last of the four
    assert "## Transfer" in text and len(table) == 4 + 3  # the transfer check's own table: the latent run again


def test_runs_over_other_items_or_labels_are_refused(tmp_path):
    verdict = load()
    errors = np.array([0.0, 1.0] * 10)
    a = write_run(tmp_path / "a", errors, [0], {0: {"msp": errors}})
    b = write_run(tmp_path / "b", 1 - errors, [0], {0: {"msp": errors}})
    with pytest.raises(SystemExit, match="same items"):
        verdict.main(["--run", str(a), "--run", str(b), "--out", str(tmp_path / "out")])


def test_another_models_run_is_set_beside_and_each_finding_compared(tmp_path):
    """A second model's run (its own labels: nothing paired across models) gets a column pair per
    model, and an estimator's standing against msp (ahead, behind, not separated) replicates or not."""
    verdict = load()
    gen = np.random.default_rng(1)
    errors = (gen.random(200) < 0.5).astype(float)
    other = (gen.random(200) < 0.3).astype(float)  # the other model's own labels
    noise = gen.normal(size=(4, 200))
    first = write_run(tmp_path / "first", errors, [0], {0: {
        "msp": errors + 1.0 * noise[0], "latent_nll": errors + 0.3 * noise[1], "posterior_var": noise[2]}})
    second = write_run(tmp_path / "second", other, [0, 1], {s: {
        "msp": other + 1.0 * noise[0], "latent_nll": other + 3.0 * noise[1 + s], "posterior_var": other + 0.2 * noise[3]}
        for s in (0, 1)})
    page = tmp_path / "results.md"
    verdict.main(["--run", str(first), "--model", f"other={second}", "--out", str(tmp_path / "out"), "--n-boot", "200",
                  "--markdown", str(page)])
    rows = {line.split(" | ")[0]: line for line in (tmp_path / "out" / "models.md").read_text().splitlines()
            if line.startswith("| `")}
    assert rows["| `latent_nll`"].endswith("| no: ahead, behind |")  # ahead on the first, far noisier on the other
    assert rows["| `posterior_var`"].endswith("| no: behind, ahead |")
    assert rows["| `msp`"].endswith("| — |")
    assert " ± " in rows["| `latent_nll`"].split(" | ")[5]  # the other model's two seeds: a spread
    assert rows["| `posterior_var`"].split(" | ")[4].startswith("-")  # behind latent_nll on the first model
    text = page.read_text()
    assert "## Across models" in text and "**other**" in text
    assert f"accuracy {1 - other.mean():.3f}" in text


def test_a_models_twin_run_is_read_with_its_tag_and_set_beside_the_first_models_twin(tmp_path):
    """``--model NAME:TAG=FOLDER`` adds another run of that model (its twin): its estimators read
    "name (TAG)" and sit in the row of the first model's run of the same tag; a run of that model over
    other labels is refused."""
    verdict = load()
    gen = np.random.default_rng(2)
    errors = (gen.random(200) < 0.5).astype(float)
    other = (gen.random(200) < 0.4).astype(float)
    noise = gen.normal(size=(4, 200))
    first = write_run(tmp_path / "first", errors, [0], {0: {"msp": errors + noise[0], "latent_nll": errors + 0.3 * noise[1]}})
    twin = write_run(tmp_path / "twin", errors, [0], {0: {"msp": errors + noise[0], "adapter_nll": errors + 0.3 * noise[2]}})
    second = write_run(tmp_path / "second", other, [0], {0: {"msp": other + noise[0], "latent_nll": other + 0.3 * noise[1]}})
    second_twin = write_run(tmp_path / "second-twin", other, [0], {0: {"msp": other + noise[0], "adapter_nll": noise[3]}})
    args = ["--run", str(first), "--run", f"twin={twin}", "--model", f"other={second}", "--out", str(tmp_path / "out"),
            "--n-boot", "200", "--markdown", str(tmp_path / "results.md")]
    verdict.main([*args, "--model", f"other:twin={second_twin}"])
    rows = {line.split(" | ")[0]: line for line in (tmp_path / "out" / "models.md").read_text().splitlines()
            if line.startswith("| `")}
    assert rows["| `adapter_nll (twin)`"].endswith("| no: ahead, behind |")  # the other model's twin is noise
    assert rows["| `latent_nll`"].endswith("| yes: ahead |")
    # the other model's twin is paired with that model's own latent_nll: noise against a good score
    assert rows["| `adapter_nll (twin)`"].split(" | ")[7].startswith("-0.")
    assert f"with `{second_twin}`" in (tmp_path / "results.md").read_text()
    bad = write_run(tmp_path / "bad", 1 - other, [0], {0: {"msp": other, "adapter_nll": other}})
    with pytest.raises(SystemExit, match="same items"):
        verdict.main([*args, "--model", f"other:twin={bad}"])
