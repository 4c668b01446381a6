"""``benchmarks/full_size.py``: every command on a model with random weights, measured.

The tiny run always runs (seconds). The full-size runs (``random:gpt2-xl`` in float32 and bf16:
about 10 GB and minutes of CPU each) are marked ``full_size`` and run only when asked for:

    python -m pytest -m full_size tests/test_full_size.py

They check that the random full-size GPT-2 XL builds, trains the latent a few steps,
evaluates 8 items with every single-pass estimator and ``latent_mi``, and scores prompts, on a CPU
of 24 GiB without running out of memory, every output saying "random weights".
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, offline_env

SCRIPT = REPO / "benchmarks" / "full_size.py"
PHASES = ("build", "train", "evaluate", "score")


def run(tmp_path, *args: str, timeout: float) -> dict:
    out = tmp_path / "full_size.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check(result: dict, label: str) -> None:
    assert result["build"]["label"] == label and result["build"]["random_weights"]
    assert result["train"]["cold"]["steps"] >= 1 and result["train"]["warm"]["steps"] >= 1  # the cache filled, then read
    assert result["train"]["frozen_cache_items"] == result["train"]["items"]
    evaluated = result["evaluate"]
    assert evaluated["random_weights"] and evaluated["dropped"] == {} and evaluated["items"] == 8
    assert {"msp", "entropy", "margin", "sequence_nll", "perplexity", "max_token_nll", "sequence_doubt",
            "mean_token_entropy", "rauq", "attention_entropy", "lens_ce", "lens_area", "posterior_var", "latent_kl",
            "latent_mi", "latent_nll"} == set(evaluated["estimators"])
    assert "accuracy" not in json.dumps(result)  # never reported: the weights are random
    assert result["score"]["errors"] == 0 and result["score"]["every_record_says_random_weights"]
    for phase in PHASES:
        assert result[phase]["peak_mib"] > 0 and result[phase]["seconds"] > 0
    assert result["train"]["warm"]["tokens_per_s"] > 0 and result["score"]["tokens_per_s"] > 0
    plan = result["plan"]
    assert plan["free_for_batches_gib"] < plan["gpu_gib"] and plan["train_batch_that_fits"] >= 1


def test_every_command_on_a_tiny_random_model_is_measured(tmp_path):
    result = run(tmp_path, "--model", "random:tiny-gpt2", "--dtype", "float32", "--train_items", "16",
                 "--batch_size", "8", "--epochs", "2", "--score_prompts", "8", timeout=300)
    check(result, "random:tiny-gpt2 (random weights)")
    assert result["build"]["n_layers"] == 4 and result["train"]["layer"] == 2


@pytest.mark.full_size
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_gpt2_xl_runs_every_command_on_a_cpu_within_24_gib(tmp_path, request, dtype):
    if "full_size" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("minutes of CPU and about 10 GB: python -m pytest -m full_size tests/test_full_size.py")
    result = run(tmp_path, "--model", "random:gpt2-xl", "--dtype", dtype, timeout=3600)
    check(result, "random:gpt2-xl (random weights)")
    assert result["build"]["parameters"] == 1_557_611_200 and result["build"]["n_layers"] == 48
    assert result["peak_mib"] < 24 * 1024
