"""Scoring and evaluation over two CPU processes (gloo) give the records of one process, in input order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ddp_helpers import evaluate_on_rank, score_on_rank
from vtrans.estimators.distributed import Shard, launch
from vtrans.evaluation.evaluate import EvalConfig
from vtrans.scoring.scorer import Scorer

PROMPTS = [
    "Complete the idiom: the early bird catches the",
    "",  # an error record, between scored ones
    "Complete the idiom: a piece of",
    "Complete the idiom: once in a blue",
    "Complete the idiom: break the",
    "Complete the idiom: spill the",
    "Complete the idiom: hit the nail on the",
]


def test_shard_deals_batches_round_robin_and_merges_in_order():
    shards = [Shard(r, 3) for r in range(3)]
    assert [[b for b in range(7) if s.mine(b)] for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Shard().merge({2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]


@pytest.mark.slow
def test_score_on_two_processes_gives_the_records_of_one(tiny_ckpt, tmp_path: Path):
    alone = list(Scorer.from_checkpoint(tiny_ckpt, device="cpu", batch_size=2, samples=4, quiet=True).score(PROMPTS))
    launch(score_on_rank, 2, "cpu", str(tiny_ckpt), PROMPTS, str(tmp_path))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == alone, f"rank {rank}"
    assert [r["prompt"] for r in alone] == PROMPTS and "error" in alone[1]


@pytest.mark.slow
def test_evaluate_on_two_processes_gives_the_rows_of_one(tiny_ckpt, tmp_path: Path):
    config = EvalConfig(
        data="builtin:test", max_items=9, batch_size=2, samples=4, passes=3, n_boot=100, keep_seen=True,
        estimators=["msp", "margin", "attention_entropy", "lens_ce", "mc_dropout_mi", "posterior_var", "latent_kl", "latent_mi"],
    )
    evaluate_on_rank(str(tiny_ckpt), config, str(tmp_path / "one"))
    launch(evaluate_on_rank, 2, "cpu", str(tiny_ckpt), config, str(tmp_path / "two"))
    one, two = ((tmp_path / d / "scores.jsonl").read_text().splitlines() for d in ("one", "two"))
    assert len(one) == 9 and one == two
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["n"] == 9


@pytest.mark.slow
def test_score_command_on_two_devices_prints_the_records_of_one(tiny_ckpt, tmp_path: Path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [sys.executable, "-m", "vtrans.cli", "score", "--ckpt", str(tiny_ckpt), "--input", str(prompts),
            "--batch_size", "2", "--samples", "4", "--device", "cpu", "--quiet"]
    # one thread per process in both runs: at the default, two ranks of two threads each share two cores
    # and their kernels may split a sum otherwise than one process does, which moves the last float bit
    # (seen once in CI); what is checked here is the split of the prompts over devices, not the threads
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([*args, "--devices", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.count("\n") == len(PROMPTS)
    bad = subprocess.run([*args[:-1], "--devices", "2", "--ckpt", str(tmp_path / "missing.ckpt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1  # one rank speaks, one line


def test_a_rank_ends_with_the_exit_code_its_system_exit_stands_for(capsys):
    """A rank ends by ``os._exit`` (the interpreter's teardown raced gloo's threads and aborted
    finished runs), so it must turn ``SystemExit`` into the code Python itself would exit with."""
    from vtrans.estimators.distributed import _exit_code

    assert [_exit_code(SystemExit(c)) for c in (None, 0, 2, 130)] == [0, 0, 2, 130]
    assert _exit_code(SystemExit("error: bad input")) == 1
    assert capsys.readouterr().err == "error: bad input\n"  # its message, as Python prints it
