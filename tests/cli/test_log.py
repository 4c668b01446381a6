"""``vtrans.log``: what a command writes to stderr, with and without ``--quiet``, in a real process.

The commands run as a user runs them (a subprocess, offline), on the tiny checkpoint. A
``FutureWarning`` is an error in these processes: the package must not call an API that its
libraries are about to remove.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import offline_env

PROMPTS = ["Complete the idiom: a piece of", "once in a blue", "kick the"]
EVERY_ESTIMATOR = (
    "msp,entropy,margin,attention_entropy,lens_ce,lens_area,mc_dropout_var,mc_dropout_entropy,mc_dropout_mi,"
    "posterior_var,latent_kl,latent_mi,latent_nll,sample_disagreement,sample_word_entropy"
)
LIBRARY_NOISE = ("Warning", "deprecated", "site-packages", "Loading weights", "it/s]")


def vtrans(*args: str) -> subprocess.CompletedProcess:
    env = offline_env()
    env["PYTHONWARNINGS"] = "error::FutureWarning"
    return subprocess.run(
        [sys.executable, "-c", "from vtrans.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_score_quiet_writes_nothing_to_stderr(tiny_ckpt):
    proc = vtrans("score", "--ckpt", str(tiny_ckpt), "--estimators", EVERY_ESTIMATOR, "--quiet", *PROMPTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(len(r["scores"]) == len(EVERY_ESTIMATOR.split(",")) for r in records)


def test_score_without_quiet_shows_nothing_of_the_libraries(tiny_ckpt):
    proc = vtrans("score", "--ckpt", str(tiny_ckpt), *PROMPTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if any(noise in line for noise in LIBRARY_NOISE)], proc.stderr
    assert len(proc.stdout.splitlines()) == len(PROMPTS)


def test_evaluate_quiet_writes_nothing_to_stderr(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    args = ["--ckpt", str(tiny_ckpt), "--out", str(out), "--max_items", "8", "--n_boot", "100"]
    proc = vtrans("evaluate", *args, "--estimators", "msp,entropy,mc_dropout_mi,latent_kl", "--passes", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert (out / "results.json").is_file()
